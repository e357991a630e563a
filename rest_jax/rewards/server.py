"""Reference reward server: serves any RewardFn over HTTP for ``reward = "remote:URL"``.

``rest-jax serve-reward --reward chrf --port 8000 [--token_env VAR] [--tls_cert C --tls_key K]``.
POST any path with {"sources", "hypotheses", "references"} -> {"rewards"} (validated to [0, 1]);
GET any path -> {"ok": true, "reward": name} (a health check, no token needed). Every error is
JSON {"error": message}, one request per connection (``Connection: close``):

  401  token set and ``Authorization: Bearer <token>`` missing or wrong (checked before the
       body is read)
  400  malformed or negative Content-Length, or a body that is not the request above
  411  no Content-Length (chunked bodies are refused)
  413  Content-Length above ``ServerLimits.max_body_bytes`` (the body is not read)
  500  the reward raised or returned invalid values (the client does not retry these)
  503  all workers and the queue are full; ``Retry-After`` says when to retry

A client silent for ``idle_timeout_s``, or whose request has not fully arrived within
``read_timeout_s``, is disconnected. Requests are scored concurrently, each on its own (no
global lock); a reward that is not thread-safe must be served with ``reward_threads=1``.
See docs/reward-server.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from rest_jax.errors import RestJaxError
from rest_jax.rewards.base import RewardFn, validate_rewards
from rest_jax.rewards.httpserver import PooledHTTPServer, ServerLimits

logger = logging.getLogger("rest_jax")

__all__ = ["ServerLimits", "PooledHTTPServer", "make_server", "check_bind", "is_loopback"]

_DIGITS = re.compile(r"^[0-9]{1,40}$")


class _Reject(Exception):
  """An HTTP error answer: ``code`` and the JSON message."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


def is_loopback(host: str) -> bool:
  """Whether every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
  if host in ("", "0.0.0.0", "::"):
    return False
  try:
    infos = socket.getaddrinfo(host, None)
  except (socket.gaierror, UnicodeError):
    return False
  return bool(infos) and all(
      ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _content_length(headers: Any, limit: int) -> int:
  """The request's body length from its headers (see the 400/411/413 answers)."""
  if headers.get("Transfer-Encoding"):
    raise _Reject(411, "Transfer-Encoding is not accepted; send the body with a Content-Length")
  values = headers.get_all("Content-Length") or []
  if not values:
    raise _Reject(411, "Content-Length is required")
  if len(set(v.strip() for v in values)) != 1 or not _DIGITS.match(values[0].strip()):
    raise _Reject(400, "Content-Length must be one non-negative integer")
  length = int(values[0].strip())
  if length > limit:
    raise _Reject(413, f"body of {length} bytes is over the server's limit of {limit} bytes; "
                  "send fewer hypotheses per request (RewardConfig.request_batch_size)")
  return length


def _parse_request(raw: bytes) -> tuple[list, list, list | None]:
  try:
    req = json.loads(raw)
    sources, hyps, refs = req["sources"], req["hypotheses"], req.get("references")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise _Reject(400, f"bad request: body is not JSON {{sources, hypotheses, references}} "
                  f"({type(e).__name__}: {e})") from None
  if not (isinstance(sources, list) and isinstance(hyps, list) and len(sources) == len(hyps)
          and (refs is None or (isinstance(refs, list) and len(refs) == len(hyps)))):
    raise _Reject(400, "bad request: sources, hypotheses (and references) must be lists of "
                  "one length")
  return sources, hyps, refs


def _make_handler(reward_fn: RewardFn, token: str | None, name: str,
                  limits: ServerLimits) -> type:
  """The request handler class serving ``reward_fn``."""
  expected = f"Bearer {token}".encode() if token is not None else None
  reward_slots = threading.BoundedSemaphore(limits.reward_threads or limits.workers)

  class Handler(BaseHTTPRequestHandler):
    """One request per connection; see the module docstring for the answers."""

    protocol_version = "HTTP/1.1"
    server: PooledHTTPServer

    def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
      body = json.dumps(obj).encode("utf-8")
      self.close_connection = True
      self.send_response(code)
      for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                         "Connection": "close", **(headers or {})}.items():
        self.send_header(key, value)
      self.end_headers()
      self.wfile.write(body)
      self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
      """Errors found by http.server itself (bad request line, too many headers), as JSON."""
      if not self.server.deadlines.disarm(self.connection):
        self.close_connection = True  # Cut off by the read deadline: nobody to answer.
        return
      self.server.count(str(code))
      self._send(code, {"error": message or HTTPStatus(code).phrase})

    def do_GET(self):  # pylint: disable=invalid-name
      self.server.deadlines.disarm(self.connection)
      self._send(200, {"ok": True, "reward": name})

    def do_POST(self):  # pylint: disable=invalid-name
      try:
        if expected is not None:
          given = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
          if not hmac.compare_digest(given, expected):
            raise _Reject(401, "missing or wrong bearer token")
        length = _content_length(self.headers, limits.max_body_bytes)
        raw = self.rfile.read(length)
        if not self.server.deadlines.disarm(self.connection) or len(raw) != length:
          self.server.count("incomplete")
          self.close_connection = True
          return  # Cut off by the read deadline, or the client went away: nobody to answer.
        sources, hyps, refs = _parse_request(raw)
        values = self._score(sources, hyps, refs)
      except _Reject as e:
        self.server.count(str(e.code))
        extra = {"WWW-Authenticate": "Bearer"} if e.code == 401 else None
        self._send(e.code, {"error": str(e)}, extra)
        return
      self.server.count("200")
      self._send(200, {"rewards": [float(v) for v in values]})

    def _score(self, sources: list, hyps: list, refs: list | None):
      try:
        with reward_slots:
          return validate_rewards(reward_fn(sources, hyps, refs), len(hyps), name)
      except RestJaxError as e:
        raise _Reject(500, str(e)) from None
      except Exception as e:  # pylint: disable=broad-except
        logger.exception("serve-reward: reward %s raised", name)
        raise _Reject(500, f"reward {name!r} raised {type(e).__name__}: {str(e)[:300]}; this is "
                      "a fault of the reward or its input, not transient") from None

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      logger.debug("serve-reward: " + format, *args)  # Never logs headers (the token).

  Handler.timeout = limits.idle_timeout_s
  return Handler


def _tls_context(tls_cert: str | None, tls_key: str | None) -> ssl.SSLContext | None:
  if not tls_cert and not tls_key:
    return None
  if not (tls_cert and tls_key):
    raise RestJaxError("serve-reward needs both --tls_cert and --tls_key (PEM files), or "
                       "neither.")
  context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  context.minimum_version = ssl.TLSVersion.TLSv1_2
  try:
    context.load_cert_chain(tls_cert, tls_key)
  except (OSError, ssl.SSLError) as e:
    raise RestJaxError(f"cannot load the TLS certificate {tls_cert} with key {tls_key} ({e}); "
                       "pass PEM files of one certificate and its private key.") from None
  return context


def check_bind(host: str, token: str | None, insecure: bool) -> None:
  """Refuses a non-loopback ``host`` without a token unless ``insecure``.

  Raises:
    RestJaxError: naming the host and the two fixes.
  """
  if token is None and not insecure and not is_loopback(host):
    raise RestJaxError(f"serve-reward on {host!r}, which is not a loopback address, without a "
                       "token would let anyone who can reach it call the reward; set "
                       "--token_env VAR (and RewardConfig.token_env on the clients), or pass "
                       "--insecure on a trusted network.")


def make_server(reward_fn: RewardFn, *, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None, name: str = "reward",
                limits: ServerLimits = ServerLimits(), insecure: bool = False,
                tls_cert: str | None = None, tls_key: str | None = None) -> PooledHTTPServer:
  """A bound, not yet started server for ``reward_fn`` (call ``serve_forever``; port 0 picks a
  free port). Calls into ``reward_fn`` run concurrently, at most ``limits.reward_threads``.

  Raises:
    RestJaxError: a non-loopback ``host`` without a token unless ``insecure``, a bad TLS
      certificate or key, or an address that cannot be bound.
  """
  check_bind(host, token, insecure)
  context = _tls_context(tls_cert, tls_key)
  if token is not None and context is None and not is_loopback(host):
    logger.warning("serve-reward: the bearer token travels unencrypted to %s; add --tls_cert "
                   "and --tls_key, or serve behind a TLS proxy.", host)
  try:
    return PooledHTTPServer((host, port), _make_handler(reward_fn, token, name, limits), limits,
                            context)
  except OSError as e:
    raise RestJaxError(f"serve-reward cannot listen on {host}:{port} ({e.strerror or e}); choose "
                       "another --host or --port, or stop the process using it.") from None
