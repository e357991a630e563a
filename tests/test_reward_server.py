"""The reward server's limits, one by one, and a bounded load test (loopback only)."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from rest_jax.cli.main import main
from rest_jax.errors import RestJaxError
from rest_jax.rewards import ChrF
from rest_jax.rewards import remote as remote_lib
from rest_jax.rewards.remote import RemoteReward
from rest_jax.rewards.server import ServerLimits, make_server

SOURCES = ["eins", "zwei", "drei", "vier"]
HYPS = ["one", "two", "tree", "for"]
REFS = ["one", "two", "three", "four"]
FAST = dict(idle_timeout_s=1.0, read_timeout_s=1.0)


@pytest.fixture
def serve():
  servers = []

  def start(reward=None, **kw):
    kw.setdefault("limits", ServerLimits(**FAST))
    server = make_server(reward or ChrF(), **kw)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    servers.append(server)
    return server, server.server_address[1]

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def _request(port, head, body=b"", timeout=5.0):
  """Sends ``head`` (request line and headers) and ``body``; returns (status, headers, JSON)."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    data = b""
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        break
      data += chunk
  head_raw, _, payload = data.partition(b"\r\n\r\n")
  lines = head_raw.decode().split("\r\n")
  headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
  return int(lines[0].split()[1]), headers, json.loads(payload)


def _post_head(length, token=None):
  auth = f"\nAuthorization: Bearer {token}" if token else ""
  return f"POST /score HTTP/1.1\nHost: x\nContent-Length: {length}{auth}"


def _body():
  return json.dumps({"sources": SOURCES, "hypotheses": HYPS, "references": REFS}).encode()


def _client(url, **kw):
  return RemoteReward(url, **dict(dict(timeout_s=5.0, max_retries=2, backoff_s=0.01), **kw))


def test_token_is_checked_before_the_body_is_read(serve, caplog):
  caplog.set_level("DEBUG", logger="rest_jax")
  _, port = serve(token="s3cret-t0ken")
  for token in (None, "wrong"):  # A 1 MB body is announced but never sent: answered at once.
    start = time.monotonic()
    code, headers, body = _request(port, _post_head(10**6, token))
    assert code == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert body == {"error": "missing or wrong bearer token"} and time.monotonic() - start < 0.9
  code, _, body = _request(port, _post_head(len(_body()), "s3cret-t0ken"), _body())
  assert code == 200 and body["rewards"][0] == 1.0
  assert "s3cret-t0ken" not in caplog.text


@pytest.mark.parametrize("length,code", [("-5", 400), ("abc", 400), ("1e3", 400), ("+5", 400),
                                         ("5\nContent-Length: 6", 400), (None, 411),
                                         (str(10**6), 413), (str(10**18), 413)])
def test_content_length_is_checked(serve, length, code):
  server, port = serve(limits=ServerLimits(max_body_bytes=1000, **FAST))
  head = "POST /score HTTP/1.1\nHost: x" + (f"\nContent-Length: {length}" if length else "")
  got, _, body = _request(port, head)
  assert got == code and body["error"]
  if code == 413:
    assert "over the server's limit of 1000 bytes" in body["error"]
  assert server.stats[str(code)] == 1


def test_bad_json_and_chunked_bodies_are_refused(serve):
  _, port = serve()
  code, _, body = _request(port, _post_head(5), b"nope!")
  assert code == 400 and body["error"].startswith("bad request")
  code, _, body = _request(port, _post_head(2), b"[]")
  assert code == 400
  code, _, body = _request(port, "POST / HTTP/1.1\nTransfer-Encoding: chunked", b"0\r\n\r\n")
  assert code == 411 and "Transfer-Encoding" in body["error"]


def test_client_gets_413_once_not_retried(serve):
  server, port = serve(limits=ServerLimits(max_body_bytes=100, **FAST))
  with pytest.raises(RestJaxError, match="HTTP 413.*request_batch_size"):
    _client(f"http://127.0.0.1:{port}/")(SOURCES, HYPS, REFS)
  assert server.stats["413"] == 1


def _cut_off_after(port, send_every_s):
  """Seconds until the server closes a connection that sends a byte every ``send_every_s``
  (never, if None)."""
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
    sock.settimeout(send_every_s or 5)
    message = _post_head(100).encode()
    for i in range(10**6):
      try:
        if send_every_s:
          sock.send(message[i % len(message):][:1])
        if sock.recv(1) == b"":
          break
      except socket.timeout:
        continue
      except OSError:
        break
  return time.monotonic() - start


def test_idle_and_slowloris_clients_are_cut_off(serve):
  server, port = serve(limits=ServerLimits(idle_timeout_s=0.2, read_timeout_s=1.0))
  assert 0.15 < _cut_off_after(port, None) < 0.9  # Idle: nothing sent.
  assert 0.95 < _cut_off_after(port, 0.05) < 2.0  # A byte every 50 ms: the read deadline.
  assert server.stats["cut_off"] == 1


def test_full_pool_answers_503_and_the_client_honours_retry_after(serve, monkeypatch):
  release = threading.Event()
  calls = []

  def slow_reward(sources, hyps, refs):
    calls.append(len(hyps))
    release.wait(5)
    return np.ones(len(hyps))

  server, port = serve(slow_reward, limits=ServerLimits(workers=1, max_queued=0, retry_after_s=2,
                                                        **FAST))
  url = f"http://127.0.0.1:{port}/"
  first = threading.Thread(target=lambda: _client(url)(SOURCES, HYPS, REFS))
  first.start()
  while not calls:
    time.sleep(0.01)
  code, headers, body = _request(port, _post_head(len(_body())), _body())
  assert code == 503 and headers["Retry-After"] == "2" and "busy" in body["error"]
  delays = []

  def fake_sleep(seconds):  # The retried client's wait: let the first request finish instead.
    delays.append(seconds)
    release.set()
    first.join()
    while server.stats.get("connections", 0) < 1:  # The server frees the slot after answering.
      time.sleep(0.01)

  monkeypatch.setattr(remote_lib, "time", types.SimpleNamespace(sleep=fake_sleep))
  np.testing.assert_array_equal(_client(url)(SOURCES, HYPS, REFS), np.ones(4))
  assert delays == [2.0] and server.stats["busy"] == 2


def test_reward_exception_is_500_and_not_retried(serve):
  calls = []

  def broken(sources, hyps, refs):
    calls.append(1)
    raise ZeroDivisionError("division by zero")

  _, port = serve(broken)
  with pytest.raises(RestJaxError, match="HTTP 500.*ZeroDivisionError.*not retried"):
    _client(f"http://127.0.0.1:{port}/")(SOURCES, HYPS, REFS)
  assert len(calls) == 1


def test_client_never_follows_a_redirect(serve, monkeypatch):
  seen = []

  class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):  # pylint: disable=invalid-name
      seen.append(dict(self.headers))
      self.send_response(302 if self.server.redirect else 200)
      self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/steal")
      self.send_header("Content-Length", "0")
      self.end_headers()

    def log_message(self, *args):
      pass

  target, redirector = HTTPServer(("127.0.0.1", 0), Recorder), HTTPServer(("127.0.0.1", 0),
                                                                            Recorder)
  target.redirect, redirector.redirect = False, True
  for s in (target, redirector):
    threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
  monkeypatch.setenv("RS_TOKEN", "tok-123")
  try:
    with pytest.raises(RestJaxError, match="HTTP 302, a redirect.*not followed"):
      _client(f"http://127.0.0.1:{redirector.server_address[1]}/", token_env="RS_TOKEN")(
          SOURCES, HYPS, REFS)
  finally:
    for s in (target, redirector):
      s.shutdown()
      s.server_close()
  assert len(seen) == 1 and seen[0]["Authorization"] == "Bearer tok-123"  # Only the first host.


def test_non_loopback_bind_needs_a_token_or_insecure(serve, capsys):
  with pytest.raises(RestJaxError, match="'0.0.0.0', which is not a loopback.*--insecure"):
    make_server(ChrF(), host="0.0.0.0")
  server, _ = serve(host="0.0.0.0", insecure=True)
  assert server.server_address[0] == "0.0.0.0"
  serve(host="0.0.0.0", token="t")
  assert main(["serve-reward", "--reward", "chrf", "--port", "0", "--host", "0.0.0.0"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--insecure" in err
  assert main(["serve-reward", "--reward", "chrf", "--port", "0", "--tls_cert", "x.pem"]) == 2
  assert "both --tls_cert and --tls_key" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(serve, tmp_path, monkeypatch):
  cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                  "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                 check=True, capture_output=True)
  _, port = serve(tls_cert=cert, tls_key=key, token="tls-tok")
  monkeypatch.setenv("SSL_CERT_FILE", cert)
  monkeypatch.setenv("RS_TOKEN", "tls-tok")
  values = _client(f"https://127.0.0.1:{port}/", token_env="RS_TOKEN")(SOURCES, HYPS, REFS)
  np.testing.assert_allclose(values, ChrF()(SOURCES, HYPS, REFS), rtol=1e-6)
  with pytest.raises(RestJaxError, match="failed after 1 tries"):  # Plain HTTP to a TLS port.
    _client(f"http://127.0.0.1:{port}/", max_retries=0, timeout_s=1.0)(SOURCES, HYPS, REFS)
  with pytest.raises(RestJaxError, match="cannot load the TLS certificate"):
    make_server(ChrF(), tls_cert=key, tls_key=key)


def _load_client(url, batches, expected, latencies, failures):
  reward = _client(url, request_batch_size=8, max_concurrency=1)
  for (sources, hyps, refs), want in zip(batches, expected):
    start = time.monotonic()
    try:
      got = reward(sources, hyps, refs)
    except RestJaxError as e:
      failures.append(str(e))
      continue
    latencies.append(time.monotonic() - start)
    if not np.allclose(got, want, rtol=1e-6):
      failures.append("wrong rewards")


def _oversized(port, results):
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
    sock.sendall(_post_head(10 * 2**20).encode().replace(b"\n", b"\r\n") + b"\r\n\r\n")
    try:
      for _ in range(10 * 16):  # Keeps sending its 10 MiB body until the server hangs up.
        sock.sendall(b"x" * 65536)
    except OSError:
      pass
    try:
      code = int(sock.recv(4096).split()[1])
    except (OSError, IndexError):
      code = 0  # Reset before the answer could be read: cut off all the same.
  results.append(("oversized", code, time.monotonic() - start))


def test_load_many_clients_while_oversized_and_slow_clients_are_cut_off(serve):
  """32 clients x 4 requests of 8 pairs, plus 2 oversized and 2 slowloris clients."""
  rng = np.random.default_rng(0)
  words = ["one", "two", "three", "four", "tree", "for", "fife", "six", "seven", "won"]
  pick = lambda: " ".join(rng.choice(words, size=3))
  plans = [[([pick() for _ in range(8)], [pick() for _ in range(8)], [pick() for _ in range(8)])
            for _ in range(4)] for _ in range(32)]
  chrf = ChrF()
  expected = [[chrf(*batch) for batch in plan] for plan in plans]
  server, port = serve(limits=ServerLimits(workers=8, max_queued=48, max_body_bytes=2**16,
                                           idle_timeout_s=1.0, read_timeout_s=1.0))
  url = f"http://127.0.0.1:{port}/score"
  latencies, failures, attackers = [], [], []
  threads = [threading.Thread(target=_oversized, args=(port, attackers)) for _ in range(2)]
  threads += [threading.Thread(target=lambda: attackers.append(
      ("slowloris", None, _cut_off_after(port, 0.1)))) for _ in range(2)]
  threads += [threading.Thread(target=_load_client, args=(url, plan, want, latencies, failures))
              for plan, want in zip(plans, expected)]
  start = time.monotonic()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=20)
  wall = time.monotonic() - start
  p50, p99 = np.percentile(latencies, [50, 99])
  print(f"\nload test: 32 clients x 4 requests (8 pairs each): {len(latencies)} ok, "
        f"{len(failures)} failed or wrong; p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"wall {wall:.2f} s; attackers {attackers}; server {server.stats}")
  assert not failures and len(latencies) == 128
  assert sorted(a[0] for a in attackers) == ["oversized"] * 2 + ["slowloris"] * 2
  for kind, code, seconds in attackers:
    assert (code in (413, 0) and seconds < 1.0) if kind == "oversized" else 0.95 < seconds < 3
  assert server.stats["413"] == 2 and server.stats["cut_off"] == 2 and p99 < 3.0
