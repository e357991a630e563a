"""A reward computed by a server: ``reward = "remote:http://host:port/path"``.

Wire format (JSON over HTTP POST, see rest_jax.rewards.server for the reference server):

  request   {"sources": [str], "hypotheses": [str], "references": [str] or null}
  response  {"rewards": [float]}       (one per hypothesis, in order), HTTP 200

The client splits a batch into sub-batches of ``request_batch_size``, sends up to
``max_concurrency`` at once, and retries a sub-batch that times out, loses its connection or gets
HTTP 408/429/502/503/504, ``max_retries`` times with exponential backoff (waiting at least the
server's ``Retry-After``, up to 60 s); then it raises a RestJaxError naming the URL and the number
of tries. Other HTTP errors are not retried: 500 means the reward itself failed, 401 a wrong
token, 413 a request too large. Redirects are never followed (the token would go to another
host). An optional bearer token is read from the environment variable named by ``token_env``; it
is sent in the Authorization header and never logged or shown in errors. ``https://`` URLs are
verified against the system's CAs (or the file named by the ``SSL_CERT_FILE`` variable).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from rest_jax.errors import RestJaxError

logger = logging.getLogger("rest_jax")

PREFIX = "remote:"
_RETRY_STATUS = {408, 429, 502, 503, 504}
_MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
  """A transient failure; ``retry_after_s`` is the server's Retry-After (0 if none)."""

  def __init__(self, message: str, retry_after_s: float = 0.0):
    super().__init__(message)
    self.retry_after_s = retry_after_s


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Turns every redirect into an HTTPError: the Authorization header never follows one."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None


def _retry_after(headers) -> float:
  """Seconds of a Retry-After header (an HTTP date or garbage counts as 0), capped at 60 s."""
  try:
    return min(max(float(headers.get("Retry-After") or 0), 0.0), _MAX_RETRY_AFTER_S)
  except (TypeError, ValueError):
    return 0.0


_FIXES = {
    401: "Set RewardConfig.token_env to the variable holding the server's token.",
    403: "Set RewardConfig.token_env to the variable holding the server's token.",
    413: "Lower RewardConfig.request_batch_size, or raise the server's --max_body_bytes.",
    500: "The reward failed on the server (not retried); fix the reward or its input.",
}


class RemoteReward:
  """RewardFn that posts batches to a reward server (see the module docstring)."""

  def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 3,
               backoff_s: float = 0.5, max_concurrency: int = 4, request_batch_size: int = 256,
               token_env: str = ""):
    if not url.startswith(("http://", "https://")):
      raise RestJaxError(f"remote reward URL {url!r} must start with http:// or https:// "
                         f"(write reward = '{PREFIX}http://host:port/score').")
    self.url = url
    self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
    self.max_concurrency, self.request_batch_size = max_concurrency, request_batch_size
    self._opener = urllib.request.build_opener(_NoRedirect)
    self._headers = {"Content-Type": "application/json"}
    if token_env:
      token = os.environ.get(token_env)
      if not token:
        raise RestJaxError(f"RewardConfig.token_env names {token_env!r}, but that environment "
                           "variable is not set; export it with the server's token.")
      self._headers["Authorization"] = f"Bearer {token}"

  def __repr__(self) -> str:
    return f"RemoteReward({self.url!r})"

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float `[n]` rewards from the server, in input order."""
    n, size = len(hypotheses), self.request_batch_size
    parts = [(list(sources[s:s + size]), list(hypotheses[s:s + size]),
              None if references is None else list(references[s:s + size]))
             for s in range(0, n, size)]
    if not parts:
      return np.zeros((0,), np.float32)
    with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(parts))) as pool:
      results = list(pool.map(lambda p: self._post_with_retries(*p), parts))
    return np.concatenate(results)

  def _post_with_retries(self, sources, hypotheses, references) -> np.ndarray:
    body = json.dumps({"sources": sources, "hypotheses": hypotheses,
                       "references": references}).encode("utf-8")
    tries = self.max_retries + 1
    for attempt in range(tries):
      try:
        return self._post(body, len(hypotheses))
      except _Retryable as e:
        if attempt + 1 == tries:
          raise RestJaxError(f"remote reward {self.url} failed after {tries} tries "
                             f"({self.max_retries} retries); last error: {e}. Check that the "
                             "server is up (rest-jax serve-reward) or raise "
                             "RewardConfig.max_retries / timeout_s.") from None
        delay = max(self.backoff_s * 2**attempt, e.retry_after_s)
        logger.warning("remote reward %s: %s; retry %d of %d in %.1fs", self.url, e,
                       attempt + 1, self.max_retries, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")

  def _post(self, body: bytes, n: int) -> np.ndarray:
    request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
    try:
      with self._opener.open(request, timeout=self.timeout_s) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      try:
        detail = e.read()[:300].decode("utf-8", "replace")
      except (OSError, http.client.HTTPException):
        detail = ""
      if e.code in _RETRY_STATUS:
        raise _Retryable(f"HTTP {e.code}: {detail}", _retry_after(e.headers)) from None
      if 300 <= e.code < 400:
        raise RestJaxError(f"remote reward {self.url} answered HTTP {e.code}, a redirect to "
                           f"{e.headers.get('Location')!r}; redirects are not followed (the "
                           "token must not go to another host): use the final URL.") from None
      raise RestJaxError(f"remote reward {self.url} answered HTTP {e.code}: {detail}. "
                         + _FIXES.get(e.code, "Fix the request or the server.")) from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
            ConnectionError) as e:
      raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    try:
      values = json.loads(payload)["rewards"]
      array = np.asarray(values, dtype=np.float64)
    except (ValueError, KeyError, TypeError):
      raise RestJaxError(f"remote reward {self.url} sent a response that is not "
                         '{"rewards": [numbers]}: ' f"{payload[:200]!r}. Fix the server.") from None
    if array.shape != (n,):
      raise RestJaxError(f"remote reward {self.url} returned {array.shape} rewards for {n} "
                         "hypotheses; the server must return one per hypothesis.")
    return array
