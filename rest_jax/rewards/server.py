"""Reference reward server: serves any RewardFn over HTTP for ``reward = "remote:URL"``.

``rest-jax serve-reward --reward chrf --port 8000 [--token_env VAR]``. POST any path with
{"sources", "hypotheses", "references"} -> {"rewards"} (validated to [0, 1]); GET /health ->
{"ok": true}. With a token, requests without ``Authorization: Bearer <token>`` get HTTP 401.
Errors are JSON {"error": message}: 400 for a malformed request, 500 when the reward fails.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rest_jax.errors import RestJaxError
from rest_jax.rewards.base import RewardFn, validate_rewards

logger = logging.getLogger("rest_jax")


def make_server(reward_fn: RewardFn, *, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None, name: str = "reward") -> ThreadingHTTPServer:
  """A ThreadingHTTPServer (not started) serving ``reward_fn``; port 0 picks a free port.

  Calls into ``reward_fn`` are serialised with a lock (a RewardFn need not be thread-safe).
  """
  lock = threading.Lock()

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, obj: Any) -> None:
      body = json.dumps(obj).encode("utf-8")
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):  # pylint: disable=invalid-name
      self._send(200, {"ok": True, "reward": name})

    def do_POST(self):  # pylint: disable=invalid-name
      length = int(self.headers.get("Content-Length") or 0)
      raw = self.rfile.read(length)
      if token is not None:
        given = self.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
          self._send(401, {"error": "missing or wrong bearer token"})
          return
      try:
        req = json.loads(raw)
        sources, hyps, refs = req["sources"], req["hypotheses"], req.get("references")
        if not (isinstance(sources, list) and isinstance(hyps, list)
                and len(sources) == len(hyps) and (refs is None or len(refs) == len(hyps))):
          raise ValueError("sources, hypotheses (and references) must be lists of one length")
      except (ValueError, KeyError, TypeError) as e:
        self._send(400, {"error": f"bad request: {e}"})
        return
      try:
        with lock:
          values = validate_rewards(reward_fn(sources, hyps, refs), len(hyps), name)
      except RestJaxError as e:
        self._send(500, {"error": str(e)})
        return
      self._send(200, {"rewards": [float(v) for v in values]})

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      logger.debug("serve-reward: " + format, *args)  # Never logs headers (the token).

  return ThreadingHTTPServer((host, port), Handler)
