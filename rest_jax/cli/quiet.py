"""Quiet start-up: native libraries' banner lines (TensorFlow's oneDNN and "Could not find cuda
drivers", libtpu's probes on hosts without TPUs) are held back unless the log level is DEBUG.

They are written by C++ code straight to file descriptor 2, before Python logging exists, so
``quiet_native_stderr`` points fd 2 at a temporary file around the imports and backend start;
the held lines are replayed if that block fails, so nothing that explains a crash is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

# Env settings read when TensorFlow is imported (setdefault: the user's own values win).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0",
             "GRPC_VERBOSITY": "ERROR"}


def set_quiet_env(quiet: bool) -> None:
  """Sets (quiet) or lowers (not quiet) TensorFlow's C++ log level before TF is imported."""
  if quiet:
    for key, value in QUIET_ENV.items():
      os.environ.setdefault(key, value)
  elif os.environ.get("TF_CPP_MIN_LOG_LEVEL") == QUIET_ENV["TF_CPP_MIN_LOG_LEVEL"]:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
  """Holds back whatever is written to fd 2 inside the block; replays it if the block raises."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      held.seek(0)
      os.write(2, held.read())
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def start_quietly(*, quiet: bool, jax_backend: bool) -> None:
  """Imports TensorFlow (and starts jax's backend if asked) with their banners held back."""
  with quiet_native_stderr(quiet):
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    if jax_backend:
      import jax  # pylint: disable=g-import-not-at-top
      jax.devices()
