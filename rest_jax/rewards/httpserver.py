"""A bounded HTTP server for the reward server: a fixed worker pool, back-pressure, deadlines.

``PooledHTTPServer`` accepts connections on one thread and hands each to one of
``ServerLimits.workers`` worker threads through a queue of at most ``max_queued`` waiting
connections. When workers and queue are full, a connection is answered ``503`` with
``Retry-After`` (by a small rejector thread, so the accepting thread never waits on a client)
and closed. Each connection carries one request (``Connection: close``), so an idle keep-alive
client never holds a worker.

Limits on a client (see ``ServerLimits``): every socket read and write times out after
``idle_timeout_s`` of silence, and a watchdog thread shuts the socket down when the TLS handshake,
headers and body have not all arrived within ``read_timeout_s`` (a slowloris client that sends a
byte now and then is cut off too). The handler enforces the body-size limit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from rest_jax.errors import RestJaxError

logger = logging.getLogger("rest_jax")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
  """The limits of ``rest-jax serve-reward`` (each a flag of the same name)."""

  workers: int = 8  # Requests handled at once (threads).
  max_queued: int = 32  # Accepted connections waiting for a worker; beyond that: 503.
  max_body_bytes: int = 16 * 2**20  # Larger request bodies: 413 (before reading them).
  idle_timeout_s: float = 10.0  # Longest silence while reading a request or sending an answer.
  read_timeout_s: float = 30.0  # Handshake, headers and body must arrive within this.
  retry_after_s: int = 1  # The Retry-After of a 503.
  reward_threads: int = 0  # Calls into the reward at once (0: one per worker; 1: serialised).

  def __post_init__(self):
    for field in ("workers", "max_body_bytes", "retry_after_s"):
      if getattr(self, field) < 1:
        raise RestJaxError(f"serve-reward --{field} must be >= 1, got {getattr(self, field)}.")
    for field in ("max_queued", "reward_threads"):
      if getattr(self, field) < 0:
        raise RestJaxError(f"serve-reward --{field} must be >= 0, got {getattr(self, field)}.")
    for field in ("idle_timeout_s", "read_timeout_s"):
      if not getattr(self, field) > 0:
        raise RestJaxError(f"serve-reward --{field} must be > 0, got {getattr(self, field)}.")


class Deadlines:
  """A watchdog thread that shuts down sockets whose deadline passed (unblocking their reader)."""

  def __init__(self, tick_s: float = 0.05):
    self._lock = threading.Lock()
    self._armed: dict[int, tuple[float, socket.socket]] = {}
    self._stop = threading.Event()
    self.expired = 0
    self._thread = threading.Thread(target=self._run, args=(tick_s,), daemon=True,
                                    name="reward-server-deadlines")
    self._thread.start()

  def arm(self, sock: socket.socket, seconds: float) -> None:
    with self._lock:
      self._armed[id(sock)] = (time.monotonic() + seconds, sock)

  def disarm(self, sock: socket.socket) -> bool:
    """Stops watching ``sock``; False if its deadline had already passed (it was shut down)."""
    with self._lock:
      return self._armed.pop(id(sock), None) is not None

  def close(self) -> None:
    self._stop.set()
    self._thread.join()

  def _run(self, tick_s: float) -> None:
    while not self._stop.wait(tick_s):
      now = time.monotonic()
      with self._lock:  # Held while shutting down: a disarmed socket is never touched.
        for key in [k for k, (deadline, _) in self._armed.items() if deadline <= now]:
          _, sock = self._armed.pop(key)
          self.expired += 1
          try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # Also for an SSLSocket.
          except OSError:
            pass


def linger_close(sock: socket.socket, seconds: float = 0.5, max_bytes: int = 1 << 20) -> None:
  """Closes ``sock`` after sending what was written and reading (and dropping) what the client
  still sends, for at most ``seconds`` and ``max_bytes``: closing with unread input would reset
  the connection, and the client could lose the answer it is about to read."""
  try:
    socket.socket.shutdown(sock, socket.SHUT_WR)
    sock.settimeout(0.1)
    deadline, drained = time.monotonic() + seconds, 0
    while time.monotonic() < deadline and drained < max_bytes:
      try:
        data = socket.socket.recv(sock, 65536)
      except socket.timeout:
        continue
      if not data:
        break
      drained += len(data)
  except OSError:
    pass
  finally:
    sock.close()


def _busy_response(retry_after_s: int) -> bytes:
  body = json.dumps({"error": "server busy: all workers and the queue are full; retry after "
                     f"{retry_after_s} s"}).encode()
  return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\n"
          "Connection: close\r\n\r\n").encode() + body


class PooledHTTPServer(socketserver.TCPServer):
  """A TCPServer with a fixed pool of worker threads (see the module docstring).

  ``stats`` counts connections, ``busy`` (503) rejections and connections cut off by the read
  deadline; the handler adds its own counts through ``count``.
  """

  allow_reuse_address = True
  request_queue_size = 128

  def __init__(self, address: tuple[str, int], handler: Any, limits: ServerLimits,
               ssl_context: ssl.SSLContext | None = None):
    if ":" in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, handler)
    self.limits, self.ssl_context = limits, ssl_context
    self.deadlines = Deadlines()
    self._slots = threading.BoundedSemaphore(limits.workers + limits.max_queued)
    self._queue: queue.Queue = queue.Queue()
    self._rejects: queue.Queue = queue.Queue(maxsize=64)
    self._stats_lock = threading.Lock()
    self._counts: dict[str, int] = {}
    self._threads = [threading.Thread(target=self._work, daemon=True,
                                      name=f"reward-server-{i}") for i in range(limits.workers)]
    self._threads += [threading.Thread(target=self._reject_loop, daemon=True,
                                       name=f"reward-server-reject-{i}") for i in range(2)]
    for thread in self._threads:
      thread.start()

  def count(self, key: str) -> None:
    with self._stats_lock:
      self._counts[key] = self._counts.get(key, 0) + 1

  @property
  def stats(self) -> dict[str, int]:
    """Counts so far: connections, busy (503), cut_off (read deadline), and the handler's."""
    with self._stats_lock:
      return dict(self._counts, cut_off=self.deadlines.expired)

  def handle_error(self, request: Any, client_address: Any) -> None:
    logger.exception("serve-reward: unexpected error serving %s", client_address[0])

  def process_request(self, request: socket.socket, client_address: Any) -> None:
    """On the accepting thread: queue the connection, or hand it to a rejector (503)."""
    if self._slots.acquire(blocking=False):
      self._queue.put((request, client_address))
      return
    self.count("busy")
    try:
      self._rejects.put_nowait(request)
    except queue.Full:  # Flooded: drop without an answer (the client sees a reset and retries).
      request.close()

  def _handshake(self, request: socket.socket, seconds: float) -> socket.socket:
    """``request`` (TLS-wrapped when serving TLS), armed with a deadline of ``seconds``."""
    request.settimeout(self.limits.idle_timeout_s)
    if self.ssl_context is not None:
      request = self.ssl_context.wrap_socket(request, server_side=True,
                                             do_handshake_on_connect=False)
    self.deadlines.arm(request, seconds)
    if self.ssl_context is not None:
      request.do_handshake()
    return request

  def _work(self) -> None:
    while True:
      item = self._queue.get()
      if item is None:
        return
      request, client_address = item
      try:
        request = self._handshake(request, self.limits.read_timeout_s)
        self.finish_request(request, client_address)
      except (OSError, ssl.SSLError) as e:  # A client that timed out, reset or failed TLS.
        logger.debug("serve-reward: connection from %s ended: %s", client_address[0], e)
      except Exception:  # pylint: disable=broad-except
        self.handle_error(request, client_address)
      finally:
        self.deadlines.disarm(request)
        linger_close(request)
        self._slots.release()
        self.count("connections")  # After the release: a counted connection's slot is free.

  def _reject_loop(self) -> None:
    while True:
      request = self._rejects.get()
      if request is None:
        return
      try:
        request = self._handshake(request, 2.0)
        request.sendall(_busy_response(self.limits.retry_after_s))
      except (OSError, ssl.SSLError):
        pass
      finally:
        self.deadlines.disarm(request)
        linger_close(request, seconds=0.2, max_bytes=1 << 16)

  def server_close(self) -> None:
    """Stops the workers (after their current connection), closes queued ones and the socket."""
    super().server_close()
    while True:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        break
      if item is not None:
        item[0].close()
    for _ in range(self.limits.workers):
      self._queue.put(None)
    for _ in range(2):
      self._rejects.put(None)
    self.deadlines.close()
