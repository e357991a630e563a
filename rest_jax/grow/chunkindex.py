"""Per-chunk record indexes of a Grow dataset: where each record lies in its chunk file.

Next to every chunk file ``chunk-h{host}-{idx}.tfrecord`` of a finalized Grow directory lies
``chunk-h{host}-{idx}.index.npy``: one fixed-width row per record (``ROW``), in file order, with
the record's index fields, the byte ``offset`` and ``length`` of its serialized tf.train.Example
inside the TFRecord file, and a 64-bit hash of its target tokens (for deduplication). A reader
seeks straight to a record (``read_payloads``: ranged reads through ``storage``, so local, NFS
and ``gs://`` alike) and never scans a chunk. The chunk files stay plain TFRecord files: tf.data
(``tf.data.TFRecordDataset``) reads them as before.

TFRecord framing (uncompressed): each record is ``uint64 length, uint32 crc(length),
bytes[length], uint32 crc(bytes)``, so record ``k``'s payload starts at
``12 + sum_{j<k} (length_j + 16)``. ``check_rows`` tests that the rows tile the file exactly.

Each host indexes a share of the chunks (``index_chunks``); host 0 then merges what it needs from
the small index files (``rest_jax.grow.dataset.finalize``), one chunk at a time.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import tensorflow as tf

from rest_jax import storage
from rest_jax.errors import RestJaxError

ROW = np.dtype([("example_id", "<i8"), ("sample_idx", "<i8"), ("offset", "<i8"),
                ("length", "<i8"), ("tokens", "<i8"), ("reward", "<f4"),
                ("is_original", "u1"), ("grow_step", "<i4")])
_HEADER, _FRAME = 12, 16  # Bytes before a payload, and framing bytes per record.
_INT = lambda: tf.io.FixedLenFeature([], tf.int64)  # pylint: disable=unnecessary-lambda-assignment
_SPEC = {"example_id": _INT(), "sample_idx": _INT(), "is_original": _INT(), "grow_step": _INT(),
         "reward": tf.io.FixedLenFeature([], tf.float32),
         "targets": tf.io.RaggedFeature(tf.int64)}


def index_name(chunk: str) -> str:
  """``chunk-h000-00001.tfrecord`` -> ``chunk-h000-00001.index.npy``."""
  return chunk[:-len(".tfrecord")] + ".index.npy"


def _parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  ex = tf.io.parse_example(serialized, _SPEC)
  text = tf.strings.reduce_join(tf.strings.as_string(ex.pop("targets")), axis=-1, separator=",")
  ex["tokens"] = tf.strings.to_hash_bucket_fast(text, 2**63 - 1)
  ex["length"] = tf.strings.length(serialized, unit="BYTE")
  return ex


def build_rows(path: str) -> np.ndarray:
  """Reads one chunk file (tf.data checks every record's CRC) and returns its ``ROW`` `[records]`.

  Raises:
    tf.errors.DataLossError / InvalidArgumentError / NotFoundError: the chunk is damaged.
  """
  parts = []
  dataset = tf.data.TFRecordDataset(path).batch(4096).map(_parse)
  for batch in dataset.as_numpy_iterator():
    part = np.zeros(batch["length"].shape, ROW)
    for key in ROW.names:
      if key != "offset":
        part[key] = batch[key]
    parts.append(part)
  rows = np.concatenate(parts) if parts else np.zeros([0], ROW)
  frames = rows["length"] + _FRAME
  rows["offset"] = _HEADER + np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)
  return rows


def check_rows(rows: np.ndarray, file_size: int | None) -> bool:
  """Whether ``rows`` tile a TFRecord file of ``file_size`` bytes exactly (False if missing)."""
  if file_size is None:
    return False
  return int((rows["length"] + _FRAME).sum()) == file_size


def to_bytes(rows: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(rows, ROW), allow_pickle=False)
  return buffer.getvalue()


def from_bytes(data: bytes) -> np.ndarray:
  rows = np.load(io.BytesIO(data), allow_pickle=False)
  if rows.dtype != ROW:
    raise ValueError(f"dtype {rows.dtype} is not the chunk index row")
  return rows


def read_rows(directory: str, chunk: str) -> np.ndarray:
  """The ``ROW`` `[records]` of one chunk: its index file if valid, else built from the chunk.

  Raises:
    RestJaxError: the chunk itself is missing or damaged (names the file and the fix).
  """
  path, index = storage.join(directory, chunk), storage.join(directory, index_name(chunk))
  file_size = storage.size(path)
  if storage.exists(index):
    try:
      rows = from_bytes(storage.read_bytes(index))
      if check_rows(rows, file_size):
        return rows
    except (ValueError, OSError, EOFError):
      pass  # A damaged or stale index file: rebuilt from the chunk below.
  try:
    rows = build_rows(path)
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    raise RestJaxError(
        f"Grow chunk {path} is corrupt, truncated or missing "
        f"({str(e).strip().splitlines()[-1][:160]}). Delete that chunk file (and COMPLETED, "
        f"stats.json and index.npz in {directory}) and rerun: the Grow step regenerates it.") \
        from None
  return rows


def _valid_index(directory: str, chunk: str) -> bool:
  index = storage.join(directory, index_name(chunk))
  if not storage.exists(index):
    return False
  try:
    rows = from_bytes(storage.read_bytes(index))
  except (ValueError, OSError, EOFError):
    return False
  return check_rows(rows, storage.size(storage.join(directory, chunk)))


def index_chunks(directory: str, chunks: Sequence[str], *, host_id: int,
                 num_hosts: int) -> None:
  """Writes the index files of this host's share of ``chunks`` (chunk j when j % num_hosts ==
  host_id) where missing or stale. Memory: one chunk's rows at a time."""
  for j, chunk in enumerate(chunks):
    if j % num_hosts == host_id and not _valid_index(directory, chunk):
      storage.write_bytes(storage.join(directory, index_name(chunk)),
                          to_bytes(read_rows(directory, chunk)))


def read_payloads(paths: Sequence[str], offsets: np.ndarray, lengths: np.ndarray,
                  handles: "FileCache") -> list[bytes]:
  """The serialized records at (``paths[i]``, ``offsets[i]``, ``lengths[i]``), one ranged read
  each, in the given order; reads are issued file by file, by increasing offset."""
  out: list[bytes] = [b""] * len(paths)
  names, codes = np.unique(np.asarray(paths, dtype=object).astype(str), return_inverse=True)
  offsets, lengths = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
  for i in np.lexsort((offsets, codes)).tolist():
    f = handles.get(str(names[codes[i]]))
    start, size = int(offsets[i]), int(lengths[i])
    f.seek(start)
    data = f.read(size)
    if len(data) != size:
      raise RestJaxError(f"{names[codes[i]]} ends before byte {start + size}: the chunk changed "
                         "after finalize. Delete it together with COMPLETED, stats.json and "
                         "index.npz in its folder and rerun the Grow step.")
    out[i] = data
  return out


class FileCache:
  """At most ``capacity`` open read handles (least recently used closed first)."""

  def __init__(self, capacity: int = 64):
    self.capacity = capacity
    self._open: dict[str, object] = {}

  def get(self, path: str):
    handle = self._open.pop(path, None)
    if handle is None:
      handle = storage.open_ranged(path)
      while len(self._open) >= self.capacity:
        oldest = next(iter(self._open))
        self._open.pop(oldest).close()
    self._open[path] = handle
    return handle

  def close(self) -> None:
    for handle in self._open.values():
      handle.close()
    self._open = {}
