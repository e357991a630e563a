"""Storage failures as user errors: a full disk, and an object store that refuses or cannot be
reached in the middle of a run.

The clients under ``rest_jax.storage`` and orbax (``tf.io.gfile`` through ``etils.epath``,
TensorStore, google-cloud-storage) each raise their own exceptions for the same failure: a
``tf.errors.PermissionDeniedError``, a ``PermissionError``, a TensorStore ``ValueError`` whose
message starts with ``PERMISSION_DENIED:``, a ``google.api_core.exceptions.Forbidden``...
``classify`` recognises them by type or by status text anywhere in the exception's chain, and
``user_errors`` turns exactly those (and a full disk or quota) into one ``RestJaxError`` naming the
path, the cause and the fix. Anything else, a programming error included, passes unchanged.

Everything rest_jax commits is written whole or not at all (``rest_jax.storage``), so the fix of a
storage failure is always the same: make the storage reachable again and rerun the same command,
which resumes from what was committed.
"""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Iterator

from rest_jax.errors import RestJaxError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
PERMISSION, MISSING, UNREACHABLE = "permission denied", "bucket not found", "unreachable"
# Type names (any module) and status texts of each cause, as the clients raise them.
_TYPES = {
    PERMISSION: ("PermissionDeniedError", "Forbidden", "Unauthorized", "UnauthenticatedError",
                 "RefreshError", "DefaultCredentialsError"),
    UNREACHABLE: ("UnavailableError", "ServiceUnavailable", "DeadlineExceededError",
                  "ConnectionError", "ConnectTimeout", "ReadTimeout", "TransportError",
                  "ProtocolError", "NewConnectionError", "MaxRetryError", "RemoteDisconnected"),
}
_TEXTS = {
    PERMISSION: ("PERMISSION_DENIED", "UNAUTHENTICATED", "HTTP response code 401",
                 "HTTP response code 403", "403 Forbidden", "401 Unauthorized"),
    MISSING: ("The specified bucket does not exist", "bucket does not exist"),
    UNREACHABLE: ("UNAVAILABLE:", "DEADLINE_EXCEEDED", "Couldn't connect to server",
                  "Could not connect", "Connection refused", "Failed to connect",
                  "Couldn't resolve host", "Connection reset", "Timeout was reached",
                  "HTTP response code 503", "HTTP response code 502"),
}
_CAUSES = {PERMISSION: "access denied (check the credentials and their role on the bucket)",
           MISSING: "the bucket or its folder is gone (check the bucket name and that it still "
                    "exists)",
           UNREACHABLE: "the storage cannot be reached (check the network, the credentials "
                        "and STORAGE_EMULATOR_HOST if you use an emulator)"}


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or an exception it was raised from) says the disk or quota is full:
  an ``OSError`` with ENOSPC / EDQUOT, or a TensorFlow / TensorStore error whose message says so."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
      return True
    if any(text in str(e) for text in _FULL_TEXTS):
      return True
  return False


def disk_full_error(path: str, error: BaseException) -> RestJaxError:
  """The one-line error for a write to ``path`` that failed with a full disk or quota."""
  reason = "disk quota exceeded" if (isinstance(error, OSError) and
                                     error.errno == errno.EDQUOT) else "no space left on device"
  return RestJaxError(f"could not write {path}: {reason}. Free space (or raise the quota) on "
                      "that file system and rerun the same command: the run resumes from what "
                      "it had committed.")


def classify(error: BaseException, *, remote: bool = True) -> str | None:
  """The storage failure behind ``error`` (``PERMISSION``, ``MISSING`` or ``UNREACHABLE``), or
  None when it is not one (a programming error, a damaged file, a missing file...).

  Only object stores (``remote``) count: a local file system's errors (a read-only folder...)
  pass unchanged. A 404 while writing means the bucket is gone (``MISSING``; the caller says
  when, see ``user_errors``).
  """
  if not remote:
    return None
  for e in _chain(error):
    if isinstance(e, RestJaxError):
      return None
    if isinstance(e, PermissionError):
      return PERMISSION
    name, text = type(e).__name__, str(e)
    for cause in (PERMISSION, UNREACHABLE):
      if name in _TYPES[cause]:
        return cause
    for cause in (PERMISSION, MISSING, UNREACHABLE):
      if any(t in text for t in _TEXTS[cause]):
        return cause
  return None


def storage_error(path: str, cause: str, error: BaseException) -> RestJaxError:
  """The one-line error for ``path`` failing with ``cause`` (a ``classify`` result)."""
  detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
  detail = re.sub(r" with body .*", "", detail)[:160]  # An HTTP error's JSON body says no more.
  return RestJaxError(f"storage failure on {path}: {_CAUSES[cause]} ({type(error).__name__}: "
                      f"{detail}). Fix the storage access, then rerun the same command: it "
                      "resumes from what was committed.")


@contextlib.contextmanager
def user_errors(path: str, *, remote: bool = True, writing: bool = False) -> Iterator[None]:
  """Turns a full disk or quota, or a storage failure (``classify``) on ``path``, into one
  RestJaxError; any other exception passes unchanged.

  Args:
    path: what is being read or written (named in the error).
    remote: whether ``path`` is on an object store (local paths: only full disks).
    writing: a write: on an object store a not-found error then means the bucket is gone.
  """
  try:
    yield
  except RestJaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if is_disk_full(e):
      raise disk_full_error(path, e) from None
    cause = classify(e, remote=remote)
    if cause is None and remote and writing and any(
        type(x).__name__ in ("NotFoundError", "FileNotFoundError", "NotFound")
        for x in _chain(e)):
      cause = MISSING
    if cause is not None:
      raise storage_error(path, cause, e) from None
    raise


def uncaught(error: BaseException) -> RestJaxError | None:
  """For the command line's last resort: the RestJaxError of a storage failure (``classify``)
  that escaped the storage layer (e.g. a tf.data reader of ``gs://`` chunks in the middle of a
  training loop), naming the first object-store URL of its message; None for anything else."""
  cause = classify(error)
  if cause is None:
    return None
  urls = [word for e in _chain(error) for word in str(e).split() if "://" in word]
  return storage_error(urls[0].strip("'\",;:()") if urls else "the object store", cause, error)
