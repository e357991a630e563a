"""Remote reward client and reference server on localhost, with a fault-injecting server."""

import json
import os
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rest_jax.grow import dataset as growdata
from rest_jax.config import GrowConfig, RewardConfig, SamplingConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow.step import run_grow
from rest_jax.rewards import ChrF, build_reward, score
from rest_jax.rewards.remote import RemoteReward
from rest_jax.rewards.server import make_server
from rest_jax.tasks import BYTE_VOCAB
from tests.test_grow import _prompts, answer_sampler

SOURCES = ["eins", "zwei", "drei", "vier", "fünf"]
HYPS = ["one", "two", "tree", "for", ""]
REFS = ["one", "two", "three", "four", "five"]


@pytest.fixture
def serve():
  servers = []

  def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}/score"

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


class FaultyServer(ThreadingHTTPServer):
  """Answers its first ``k`` requests with ``mode`` ("error": HTTP 503, "drop": closes the
  connection, "slow": answers after 1 s), then serves chrF; ``k = -1`` fails forever."""

  def __init__(self, mode, k):
    self.mode, self.k, self.requests = mode, k, 0
    self.lock = threading.Lock()
    chrf = ChrF()

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def do_POST(self):  # pylint: disable=invalid-name
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
          server.requests += 1
          failing = server.k < 0 or server.requests <= server.k
        if failing and server.mode == "drop":
          self.close_connection = True
          return
        if failing and server.mode == "slow":
          time.sleep(1.0)
        code, body = (503, {"error": "busy"}) if failing and server.mode == "error" else (
            200, {"rewards": [float(v) for v in chrf(req["sources"], req["hypotheses"],
                                                     req["references"])]})
        data = json.dumps(body).encode()
        try:
          self.send_response(code)
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass

      def log_message(self, *args):
        pass

    super().__init__(("127.0.0.1", 0), Handler)


def _client(url, **kw):
  kw = dict(dict(timeout_s=0.3, max_retries=2, backoff_s=0.01, request_batch_size=2,
                 max_concurrency=2), **kw)
  return RemoteReward(url, **kw)


def test_reference_server_serves_chrf_with_token(serve, monkeypatch):
  monkeypatch.setenv("RM_TEST_TOKEN", "s3cret")
  url = serve(make_server(ChrF(), token="s3cret", name="chrf"))
  local = ChrF()(SOURCES, HYPS, REFS)
  config = RewardConfig(token_env="RM_TEST_TOKEN", request_batch_size=2, max_concurrency=3)
  remote = build_reward("remote:" + url, config)
  np.testing.assert_allclose(remote(SOURCES, HYPS, REFS), local, rtol=1e-6)
  assert remote(SOURCES, HYPS, REFS)[0] == 1.0 and "s3cret" not in repr(remote)
  with pytest.raises(RestJaxError, match="HTTP 401.*token_env"):  # Not retried: 1 request.
    _client(url)(SOURCES, HYPS, REFS)
  with pytest.raises(RestJaxError, match="RM_MISSING_TOKEN.*not set"):
    build_reward("remote:" + url, RewardConfig(token_env="RM_MISSING_TOKEN"))
  body = urllib.request.urlopen(url.replace("/score", "/health")).read()
  assert json.loads(body) == {"ok": True, "reward": "chrf"}


def test_reference_server_reports_an_invalid_reward_as_an_error(serve):
  url = serve(make_server(lambda s, h, r: np.full(len(h), 2.0), name="bad"))
  with pytest.raises(RestJaxError, match=r"HTTP 500.*returned 2.0.*outside \[0, 1\]"):
    _client(url)(SOURCES, HYPS, REFS)


@pytest.mark.parametrize("mode", ["error", "drop", "slow"])
def test_remote_retries_then_matches_local(serve, mode):
  server = FaultyServer(mode, k=2)
  url = serve(server)
  values = _client(url, max_concurrency=1)(SOURCES, HYPS, REFS)
  np.testing.assert_allclose(values, ChrF()(SOURCES, HYPS, REFS), rtol=1e-6)
  assert server.requests == 3 + 2  # 3 sub-batches of <= 2, the first needed 2 retries.


def test_remote_fails_clearly_after_retries(serve):
  server = FaultyServer("error", k=-1)
  url = serve(server)
  with pytest.raises(RestJaxError) as info:
    _client(url, request_batch_size=8)(SOURCES, HYPS, REFS)
  assert url in str(info.value) and "after 3 tries (2 retries)" in str(info.value)
  assert "HTTP 503" in str(info.value) and server.requests == 3


def _file_bytes(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def test_grow_with_a_failing_server_writes_nothing_twice(serve, tmp_path):
  prompts = _prompts(range(6), True)
  cfg = GrowConfig(sampling=SamplingConfig(num_samples=2, batch_size=2), chunk_size=2)
  local = lambda s, h, r: score(ChrF(), "chrf", s, h, r)
  directory = str(tmp_path / "g")
  kw = dict(params=None, prompts=prompts, vocab=BYTE_VOCAB, grow_step=1, seed=0, config=cfg,
            input_len=8, target_len=8, progress=False)
  writer = growdata.GrowWriter(directory)
  run_grow(sampler=answer_sampler(2), reward=local, writer=writer, **dict(kw, prompts=prompts[:2]))
  before = _file_bytes(directory)
  dead = _client(serve(FaultyServer("drop", k=-1)))
  with pytest.raises(RestJaxError, match="after 3 tries"):
    run_grow(sampler=answer_sampler(2), reward=lambda s, h, r: score(dead, "remote", s, h, r),
             writer=writer, **kw)
  assert _file_bytes(directory) == before  # Chunk 0 untouched, nothing else written.
  flaky = _client(serve(FaultyServer("error", k=2)))
  assert run_grow(sampler=answer_sampler(2), reward=lambda s, h, r: score(flaky, "remote", s, h, r),
                  writer=writer, **kw) == 2
  assert _file_bytes(directory)[growdata.chunk_name(0, 0)] == before[growdata.chunk_name(0, 0)]
  records = list(growdata.read_records(directory))
  keys = [(r.example_id, r.sample_idx) for r in records]
  assert len(keys) == len(set(keys)) == 6 * 3  # 2 samples + 1 original per prompt, once each.
  ref_dir = str(tmp_path / "ref")
  run_grow(sampler=answer_sampler(2), reward=local, writer=growdata.GrowWriter(ref_dir), **kw)
  expected = {(r.example_id, r.sample_idx): r.reward for r in growdata.read_records(ref_dir)}
  assert {k: r.reward for k, r in zip(keys, records)} == pytest.approx(expected)
