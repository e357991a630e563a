"""Paths and the file-system queries of the storage layer (``rest_jax.storage`` re-exports
every public name here): local, shared (NFS) and object-store (``gs://``) paths through
``etils.epath``, each query's storage failures turned into one RestJaxError."""

from __future__ import annotations

import contextlib
import functools
import os
import re

from etils import epath

from rest_jax import storage_errors
from rest_jax.errors import RestJaxError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def user_errors(path: str, *, writing: bool = False) -> contextlib.AbstractContextManager:
  """Turns a full disk or quota, or a storage failure (access denied, bucket gone, storage
  unreachable) on ``path`` into one RestJaxError naming the path, the cause and the fix; any
  other exception passes unchanged (``rest_jax.storage_errors``)."""
  return storage_errors.user_errors(path, remote=not is_local(path), writing=writing)


def _guarded(fn):
  """``fn(path, ...)`` with its storage failures as RestJaxErrors (``user_errors``)."""
  @functools.wraps(fn)
  def guarded(path, *args, **kwargs):
    with user_errors(str(path)):
      return fn(path, *args, **kwargs)
  return guarded


def is_local(path: str) -> bool:
  """Whether ``path`` is on a POSIX file system (not an object-store URL)."""
  return not _URL.match(str(path))


def join(*parts: str) -> str:
  """Joins path parts (``/`` for URLs, ``os.path.join`` for local paths)."""
  if not parts:
    raise ValueError("join needs at least one part")
  if is_local(parts[0]):
    return os.path.join(*parts)
  return "/".join([str(parts[0]).rstrip("/")] + [str(p).strip("/") for p in parts[1:]])


def dirname(path: str) -> str:
  """The folder of ``path`` (``gs://b/a/x`` -> ``gs://b/a``)."""
  return os.path.dirname(path) if is_local(path) else str(path).rstrip("/").rsplit("/", 1)[0]


def absolute(path: str) -> str:
  """A local path made absolute; URLs unchanged."""
  return os.path.abspath(path) if is_local(path) else str(path).rstrip("/")


@_guarded
def exists(path: str) -> bool:
  return epath.Path(path).exists()


@_guarded
def require_file(path: str, missing: str) -> str:
  """``path`` if it is an existing file; else RestJaxError(``missing``), which names the fix."""
  p = epath.Path(path)
  if not p.exists() or p.is_dir():
    raise RestJaxError(missing)
  return path


@_guarded
def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
  """Creates a folder and its parents (a no-op where it exists; object stores need none)."""
  p = epath.Path(path)
  if is_local(path) and p.exists() and not p.is_dir():
    raise RestJaxError(f"{path} exists and is a file, not a folder; choose another path.")
  with user_errors(path, writing=True):
    p.mkdir(parents=True, exist_ok=True)


@_guarded
def listdir(path: str) -> list[str]:
  """Sorted names in a folder; [] for a missing one."""
  p = epath.Path(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


@_guarded
def size(path: str) -> int | None:
  """Size in bytes, or None if the file is missing."""
  p = epath.Path(path)
  return int(p.stat().length) if p.exists() else None


@_guarded
def remove(path: str) -> None:
  """Removes a file (a missing one is fine)."""
  p = epath.Path(path)
  if p.exists():
    p.unlink()


@_guarded
def rmtree(path: str) -> None:
  """Removes a folder and everything in it (a missing one is fine)."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()
