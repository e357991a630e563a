"""A reward computed by a server: ``reward = "remote:http://host:port/path"``.

Wire format (JSON over HTTP POST, see rest_jax.rewards.server for the reference server):

  request   {"sources": [str], "hypotheses": [str], "references": [str] or null}
  response  {"rewards": [float]}       (one per hypothesis, in order), HTTP 200

The client splits a batch into sub-batches of ``request_batch_size``, sends up to
``max_concurrency`` at once, and retries a sub-batch that times out, loses its connection or gets
HTTP 408/429/5xx, ``max_retries`` times with exponential backoff; then it raises a RestJaxError
naming the URL and the number of tries. Other HTTP errors (e.g. 401) are not retried. An optional
bearer token is read from the environment variable named by ``token_env``; it is sent in the
Authorization header and never logged or shown in errors.
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
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class _Retryable(Exception):
  pass


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
        delay = self.backoff_s * 2**attempt
        logger.warning("remote reward %s: %s; retry %d of %d in %.1fs", self.url, e,
                       attempt + 1, self.max_retries, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")

  def _post(self, body: bytes, n: int) -> np.ndarray:
    request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      detail = e.read()[:300].decode("utf-8", "replace")
      if e.code in _RETRY_STATUS:
        raise _Retryable(f"HTTP {e.code}: {detail}") from None
      raise RestJaxError(f"remote reward {self.url} answered HTTP {e.code}: {detail}. "
                         + ("Set RewardConfig.token_env to the variable holding the server's "
                            "token." if e.code in (401, 403) else
                            "Fix the request or the server.")) from None
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
