"""The one storage layer: every file rest_jax writes, and every workdir file it reads.

Paths are strings: a local path, a shared (NFS) path, or a URL of an object store
(``gs://bucket/path``). Everything goes through ``etils.epath``, the path layer orbax uses for
checkpoints, so our files and orbax's live side by side under one workdir on any of them.

Commit semantics (what a reader may rely on):

* ``atomic_path`` / ``write_bytes`` / ``write_json``: a file either does not exist or holds
  everything that was written. Locally the data goes to a temporary name in the same folder, is
  flushed and fsynced, then renamed over the final name (and the folder fsynced). On an object
  store an object becomes visible only when its upload completes, and there is no atomic rename,
  so the content is written to a local temporary and uploaded in one piece: an object exists
  whole or not at all (a killed upload leaves nothing), and a writer that raises uploads
  nothing.
* ``overwrite=False``: refuses to replace an existing file (immutable Grow chunks). Locally a
  hard link refuses atomically; an object store is checked before the write and again before
  the upload (each file has one writer: chunks are named by host).
* A local temporary file is named ``.{name}.{8 hex}.tmp`` next to ``name``; one left by a
  killed writer is recognised by ``temp_target`` (and never read as data).
* Markers: write data first and the marker last; readers trust only what a marker or a manifest
  names.
* A full disk or quota (ENOSPC / EDQUOT) while writing is one ``RestJaxError`` naming the file
  and saying to free space and rerun; the temporary is removed and committed files are untouched.
  So is a storage failure of any read or write here (access denied, bucket deleted, network
  down: ``rest_jax.storage_errors``), whose fix is to restore access and rerun the same command.

No other module calls ``os.replace``, ``os.rename``, ``tf.io.gfile.rename`` or opens a workdir
file for writing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import tempfile
import uuid
from typing import Any, Iterator, Sequence

from etils import epath

from rest_jax.errors import RestJaxError
# Paths and queries, re-exported: callers use ``storage.join``, ``storage.exists``, ...
from rest_jax.storage_paths import (_guarded, absolute, dirname, exists, is_local, isdir, join,
                                    listdir, makedirs, remove, require_file, rmtree, size,
                                    user_errors)

__all__ = ["absolute", "atomic_dir", "atomic_path", "copy_tree", "dirname", "exists",
           "is_local", "isdir", "join", "json_default", "listdir", "local_folder", "makedirs",
           "open_ranged", "open_read", "open_write", "read_bytes", "read_json", "read_text",
           "remove", "require_file", "rmtree", "size", "temp_target", "user_errors",
           "write_bytes", "write_json", "write_text"]

_TEMP = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.tmp$")
_UPLOADS = 16  # Parallel uploads of an atomic_dir's files to an object store.


def temp_target(name: str) -> str | None:
  """The file name that the ``atomic_path`` temporary ``name`` commits to; None if ``name``
  is not such a temporary (e.g. ``.chunk.tfrecord.0a1b2c3d.tmp`` -> ``chunk.tfrecord``)."""
  match = _TEMP.match(name)
  return match.group(1) if match else None


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _commit_new(tmp: str, path: str) -> None:
  """Renames ``tmp`` onto ``path`` unless ``path`` exists (a hard link refuses atomically)."""
  try:
    os.link(tmp, path)
  except FileExistsError:
    raise RestJaxError(f"{path} appeared while it was being written; another process writes "
                       "the same file. Run one writer per file.") from None
  except OSError:  # A file system without hard links: check, then rename.
    if os.path.exists(path):
      raise RestJaxError(f"{path} appeared while it was being written; another process "
                         "writes the same file. Run one writer per file.") from None
    os.replace(tmp, path)


@contextlib.contextmanager
def _staged(path: str, *, folder: bool = False) -> Iterator[str]:
  """A local temporary file (or folder) for the content of object ``path``; removed on exit."""
  with tempfile.TemporaryDirectory(prefix="rest_jax_upload_") as tmp:
    staged = os.path.join(tmp, "content")
    if folder:
      os.mkdir(staged)
    with user_errors(path, writing=True):
      yield staged


def _upload(local: str, path: str, *, overwrite: bool) -> None:
  """Copies local file ``local`` to object ``path`` (one upload: it appears whole or not)."""
  if not overwrite and exists(path):  # Object stores have no rename that refuses; see above.
    raise RestJaxError(f"{path} appeared while it was being written; another process writes "
                       "the same file. Run one writer per file.")
  with user_errors(path, writing=True):
    epath.Path(local).copy(epath.Path(path), overwrite=True)


@contextlib.contextmanager
def atomic_path(path: str, *, overwrite: bool = True) -> Iterator[str]:
  """Yields a path to write ``path``'s content to; commits it when the block exits cleanly.

  Use it for writers that need a file name (TFRecord writers, savers). Locally the yielded
  path is a temporary sibling, fsynced and renamed onto ``path`` on exit (removed on an
  exception). On an object store it is a local temporary file, uploaded to ``path`` on exit
  (the object appears whole when its upload completes; nothing is uploaded on an exception).

  Raises:
    RestJaxError: ``overwrite=False`` and ``path`` already exists.
  """
  if not overwrite and exists(path):
    raise RestJaxError(f"{path} already exists and is never rewritten; delete it to write it "
                       "again.")
  if not is_local(path):
    with _staged(path) as tmp:
      yield tmp
      _upload(tmp, path, overwrite=overwrite)
    return
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with user_errors(path, writing=True):
      os.makedirs(folder, exist_ok=True)
      yield tmp
      _fsync(tmp)
      if overwrite:
        os.replace(tmp, path)
      else:
        _commit_new(tmp, path)
      _fsync(folder)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def open_write(path: str, mode: str = "w", *, overwrite: bool = True) -> Iterator[Any]:
  """A file object (``mode`` "w" or "wb") whose content is committed to ``path`` atomically
  when the block exits cleanly (see ``atomic_path``); for writes streamed in pieces."""
  if mode not in ("w", "wb"):
    raise ValueError(f"open_write mode must be 'w' or 'wb', got {mode!r}")
  with atomic_path(path, overwrite=overwrite) as tmp:
    with epath.Path(tmp).open(mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
      yield f


@contextlib.contextmanager
def atomic_dir(path: str, *, last: Sequence[str] = ()) -> Iterator[str]:
  """Yields a local folder to fill; it appears at ``path`` (which must not exist) only when the
  block exits cleanly.

  Locally the folder is a temporary sibling (``.{name}.{8 hex}.tmp``), renamed onto ``path`` on
  exit and removed on an exception. On an object store it is a local temporary folder whose
  files are uploaded on exit (16 at a time), the files named in ``last`` (relative paths) after
  all others have completed:
  readers trust a folder once such a file (a config, a marker) exists.

  Raises:
    RestJaxError: ``path`` already exists.
  """
  if exists(path):
    raise RestJaxError(f"{path} already exists; choose a new path or delete it.")
  if not is_local(path):
    with _staged(path, folder=True) as tmp:
      yield tmp
      files = sorted(os.path.relpath(os.path.join(root, n), tmp)
                     for root, _, names in os.walk(tmp) for n in names)
      makedirs(path)
      upload = lambda rel: _upload(os.path.join(tmp, rel), join(path, *rel.split(os.sep)),
                                   overwrite=False)
      with concurrent.futures.ThreadPoolExecutor(_UPLOADS) as pool:  # One object per request.
        list(pool.map(upload, [f for f in files if f not in last]))
      for rel in (f for f in files if f in last):
        upload(rel)
    return
  parent = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}."
                     f"{uuid.uuid4().hex[:8]}.tmp")
  try:
    with user_errors(path, writing=True):
      os.makedirs(tmp)
      yield tmp
      if os.path.exists(path):
        raise RestJaxError(f"{path} appeared while it was being written; another process "
                           "writes the same folder. Run one writer per folder.")
      os.rename(tmp, path)
      _fsync(parent)
  finally:
    if os.path.exists(tmp):
      rmtree(tmp)


def copy_tree(source: str, path: str) -> None:
  """Copies the folder ``source`` (every file, recursively) to ``path``, which must not exist;
  ``path`` appears whole or not at all (``atomic_dir``)."""
  root = epath.Path(source)
  if not root.is_dir():
    raise RestJaxError(f"{source} is not a folder; nothing to copy to {path}.")
  with atomic_dir(path) as tmp:
    folders = [(root, tmp)]  # Walked with iterdir: object stores refuse recursive globs.
    while folders:
      folder, out = folders.pop()
      os.makedirs(out, exist_ok=True)
      for item in folder.iterdir():
        if item.is_dir():
          folders.append((item, os.path.join(out, item.name)))
          continue
        with item.open("rb") as src, open(os.path.join(out, item.name), "wb") as dst:
          while block := src.read(1 << 24):
            dst.write(block)


def write_bytes(path: str, data: bytes, *, overwrite: bool = True) -> None:
  """Writes ``data`` to ``path`` atomically (see ``atomic_path``)."""
  with open_write(path, "wb", overwrite=overwrite) as f:
    f.write(data)


def write_text(path: str, text: str, *, overwrite: bool = True) -> None:
  """Writes UTF-8 ``text`` to ``path`` atomically."""
  write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def json_default(value: Any) -> Any:
  """JSON for numpy scalars and arrays (``json.dumps(default=...)``)."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if hasattr(value, "item"):
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str, obj: Any, *, overwrite: bool = True) -> None:
  """Writes ``obj`` as indented JSON atomically (numpy values become plain numbers/lists)."""
  write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n", overwrite=overwrite)


_REBUILD = "restore it, or delete it and rerun to rebuild what it records."


@_guarded
def read_bytes(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except FileNotFoundError as e:
    raise RestJaxError(f"{path} does not exist.") from e
  except IsADirectoryError:
    raise RestJaxError(f"{path} is a folder where a file was expected; {_REBUILD}") from None


def read_text(path: str) -> str:
  """A UTF-8 text file.

  Raises:
    RestJaxError: missing, a folder, or not UTF-8 (names the file and the fix).
  """
  data = read_bytes(path)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RestJaxError(f"{path} is corrupt (not UTF-8 text at byte {e.start}); {_REBUILD}") \
        from None


def read_json(path: str, *, keys: Sequence[str] | None = None, fix: str = _REBUILD) -> Any:
  """Parses a JSON file; with ``keys`` (possibly empty) it must be an object holding them.

  Args:
    path: the file.
    keys: None, or the keys the object must hold.
    fix: the end of the error message (default: restore it, or delete it and rerun).
  Raises:
    RestJaxError: missing, not UTF-8, truncated, corrupt, or not the object rest_jax wrote
      (names the file and ``fix``).
  """
  data = read_bytes(path)
  try:
    value = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise RestJaxError(f"{path} is corrupt (not UTF-8 text at byte {e.start}); {fix}") from None
  except json.JSONDecodeError as e:
    raise RestJaxError(f"{path} is corrupt or truncated ({e.msg} at line {e.lineno}); "
                       f"{fix}") from None
  if keys is not None:
    if not isinstance(value, dict):
      raise RestJaxError(f"{path} holds a JSON {type(value).__name__}, not the object rest_jax "
                         f"wrote; {fix}")
    missing = [k for k in keys if k not in value]
    if missing:
      raise RestJaxError(f"{path} lacks {', '.join(map(repr, missing))}: it is not the file "
                         f"rest_jax wrote; {fix}")
  return value


@_guarded
def open_ranged(path: str) -> Any:
  """An open binary file for many small ``seek`` + ``read`` calls (the caller closes it): an
  unbuffered local file (each read reads just its bytes), or epath's reader of an object-store
  URL (ranged reads)."""
  if is_local(path):
    return open(path, "rb", buffering=0)  # pylint: disable=consider-using-with
  # epath's TF backend returns a context manager, not a file: open the GFile it wraps.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile.GFile(path, "rb")


@contextlib.contextmanager
def local_folder(path: str) -> Iterator[str]:
  """``path`` itself when local; for a URL, a local temporary copy of the files directly in it
  (for readers that open only local files, e.g. safetensors), removed on exit."""
  if is_local(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="rest_jax_download_") as tmp, user_errors(path):
    for name in listdir(path):
      source = epath.Path(join(path, name))
      if not source.is_dir():
        source.copy(epath.Path(tmp) / name)
    yield tmp


@contextlib.contextmanager
def open_read(path: str, mode: str = "rb") -> Iterator[Any]:
  """A file object for reading (any path kind)."""
  with user_errors(path), epath.Path(path).open(mode) as f:
    yield f
