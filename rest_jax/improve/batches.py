"""Training batches that do not depend on the number of hosts.

Two sources of global batches, each host keeping only the rows its devices hold:

* ``host_batches`` (BC on D): every host iterates the same global batch stream
  (``data.train_batches``) and keeps its rows.
* ``ImproveBatches`` (Improve on a Grow mixture): streamed and sharded by host. The Improve set
  is written by ``selected.select_to_disk`` in a canonical order of M records (bucket, then
  example_id, sample_idx, Grow set: a function of the records, not of who wrote them). Epoch e
  visits them in the order of a keyed Feistel permutation of [0, M) (``permute``, key (seed, e)),
  and epochs are concatenated, so the j-th training example is record ``permute(j % M,
  epoch=j // M)`` and global batch k holds examples ``k * batch .. (k + 1) * batch - 1``. A host
  computes the positions of its own rows only, finds each record's bucket by the bucket count
  table, reads its selected row (24 bytes) and then its serialized record (a ranged read of the
  chunk file through ``storage``), and parses and pads them. No host reads another host's rows.

Host memory of ``ImproveBatches``: the bucket count table and paths (about 100 bytes per bucket
of 2^20 records and per chunk file of the mixed Grow sets), at most 64 open file handles per reading thread, and the batches in flight (the
prefetch queue, 4 by default). It does
not grow with the Grow set. The loader's position is the next global batch index (``state``);
the Improve checkpoint stores it with the selection's fingerprint, so a resumed phase continues
with exactly the next batch.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from typing import Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf

from rest_jax.errors import RestJaxError
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.improve.selected import SELECTED_ROW, Selection, mix64
from rest_jax.models.base import PAD_ID
from rest_jax.parallel import distributed

_ROUNDS = 6
_SPEC = {"inputs": tf.io.RaggedFeature(tf.int64), "targets": tf.io.RaggedFeature(tf.int64),
         "behaviour_logprobs": tf.io.RaggedFeature(tf.float32),
         "reward": growdata.FEATURES["reward"], "is_original": growdata.FEATURES["is_original"],
         "example_id": growdata.FEATURES["example_id"]}


def _round_keys(seed: int, epoch: np.ndarray) -> list[np.ndarray]:
  with np.errstate(over="ignore"):
    return _keys(seed, epoch)


def _keys(seed: int, epoch: np.ndarray) -> list[np.ndarray]:
  base = mix64(np.uint64(seed) * np.uint64(0x100000001B3) ^ mix64(np.asarray(epoch, np.uint64)))
  return [mix64(base + np.uint64(r + 1)) for r in range(_ROUNDS)]


def permute(index: np.ndarray, size: int, *, seed: int, epoch: np.ndarray | int) -> np.ndarray:
  """A keyed pseudo-random permutation of [0, size), evaluated at ``index`` (no O(size) array).

  A balanced Feistel network over the smallest even-bit power of two >= size, with cycle walking
  (reapplied until the value falls inside [0, size)).

  Args:
    index: int64 `[n]` positions in [0, size).
    size: the permutation's size (>= 1).
    seed / epoch: the key; ``epoch`` may be an int64 `[n]` array (one per position).
  Returns:
    int64 `[n]`: the permuted positions; for a fixed key a bijection of [0, size).
  """
  index = np.asarray(index, np.int64)
  half = max(1, (int(size - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = _round_keys(seed, np.broadcast_to(np.asarray(epoch, np.int64), index.shape))
  out = index.astype(np.uint64)
  todo = np.ones(index.shape, bool)
  while todo.any():
    x = out[todo]
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
      left, right = right, left ^ (mix64(right ^ key[todo]) & mask)
    out[todo] = (left << np.uint64(half)) | right
    todo = out >= np.uint64(size)
  return out.astype(np.int64)


class ImproveBatches:
  """This host's rows of each global Improve batch, read straight from the Grow chunks."""

  def __init__(self, selected: Selection, *, batch_size: int, seed: int, rows: slice,
               input_len: int, target_len: int):
    """Args: the Selection; the global ``batch_size``; the shuffle ``seed``; the global batch
    ``rows`` this host holds (``distributed.process_rows``); the padded lengths."""
    if selected.count < 1:
      raise RestJaxError("the training dataset is empty: nothing passed the filters. Lower the "
                         "threshold, or check the task's train split and the rewards.")
    self.selected = selected
    self.batch_size, self.seed, self.rows = batch_size, seed, rows
    self.input_len, self.target_len = input_len, target_len
    self._starts = np.concatenate([[0], np.cumsum(selected.bucket_counts)])
    self._local = threading.local()  # One FileCache per reading thread.
    self._chunk_paths = [[selected.chunk_path(s, f) for f in range(len(files))]
                         for s, files in enumerate(selected.files)]
    self._bucket_paths = [selected.bucket_path(b) for b in range(len(selected.bucket_counts))]

  @property
  def _files(self) -> chunkindex.FileCache:
    if not hasattr(self._local, "files"):
      self._local.files = chunkindex.FileCache()
    return self._local.files

  def state(self, next_batch: int) -> dict:
    """The loader position to checkpoint: the next global batch and what it indexes."""
    digest = hashlib.sha256(f"{self.selected.fingerprint}:{self.batch_size}:{self.seed}"
                            .encode()).hexdigest()[:16]
    return {"next_batch": int(next_batch), "records": self.selected.count, "fingerprint": digest}

  def records(self, batch: int) -> np.ndarray:
    """int64 `[host rows]`: the canonical positions of this host's rows of global ``batch``."""
    j = batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)[self.rows]
    size = self.selected.count
    return permute(j % size, size, seed=self.seed, epoch=j // size)

  def _selected_rows(self, positions: np.ndarray) -> np.ndarray:
    buckets = np.searchsorted(self._starts, positions, side="right") - 1
    paths = [self._bucket_paths[b] for b in buckets.tolist()]
    offsets = (positions - self._starts[buckets]) * SELECTED_ROW.itemsize
    data = chunkindex.read_payloads(paths, offsets, np.full(positions.shape,
                                                            SELECTED_ROW.itemsize),
                                    self._files)
    return np.frombuffer(b"".join(data), SELECTED_ROW)

  def batch(self, batch: int) -> dict[str, np.ndarray]:
    """This host's rows of global batch ``batch`` (shapes as ``data.train_batches``):
    "inputs" int32 `[rows, input_len]`, "targets" int32 `[rows, target_len]`, "reward" f32
    `[rows]`, "behaviour_logprobs" f32 `[rows, target_len]`, "is_original" int32 `[rows]`,
    "example_id" int64 `[rows]`."""
    sel = self._selected_rows(self.records(batch))
    paths = [self._chunk_paths[s][f] for s, f in zip(sel["source"].tolist(), sel["file"].tolist())]
    payloads = chunkindex.read_payloads(paths, sel["offset"], sel["length"], self._files)
    ex = tf.io.parse_example(tf.constant(payloads), _SPEC)
    out = {}
    for key, length, dtype in (("inputs", self.input_len, np.int32),
                               ("targets", self.target_len, np.int32),
                               ("behaviour_logprobs", self.target_len, np.float32)):
      ragged = ex[key]
      longest = int(np.diff(ragged.row_splits.numpy()).max(initial=0))
      if longest > length:
        name = "input" if key == "inputs" else "target"
        raise RestJaxError(f"training data: example longer than {name}_len={length} ({longest} "
                           f"{name} tokens); raise {name}_len (RunConfig) so nothing is "
                           "truncated")
      out[key] = ragged.to_tensor(default_value=PAD_ID if dtype == np.int32 else 0.0,
                                  shape=[len(payloads), length]).numpy().astype(dtype)
    out["reward"] = sel["reward"].astype(np.float32)  # The selection's (versioned) reward.
    out["is_original"] = ex["is_original"].numpy().astype(np.int32)
    out["example_id"] = ex["example_id"].numpy().astype(np.int64)
    return out

  def iterate(self, start: int, *, prefetch: int = 4,
              workers: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start``, ``start + 1``, ... forever, in order; ``prefetch`` of them are read
    ahead by ``workers`` threads (file reads and parsing release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      pending = [pool.submit(self.batch, start + i) for i in range(prefetch)]
      k = start + prefetch
      while True:
        yield pending.pop(0).result()
        pending.append(pool.submit(self.batch, k))
        k += 1


def host_batches(batches: Iterator[Mapping[str, np.ndarray]],
                 sharding: jax.sharding.Sharding) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch (all rows with one process).

  Args:
    batches: global batches ``{key: [global_batch, ...]}``, the same on every host.
    sharding: the batch sharding the rows go to (``Trainer.batch_sharding``).
  Yields:
    ``{key: [global_batch / process_count, ...]}``: the rows this process's devices hold.
  """
  rows = None
  for batch in batches:
    if jax.process_count() == 1:
      yield dict(batch)
      continue
    if rows is None:
      size = len(next(iter(batch.values())))
      rows = distributed.process_rows(sharding, size)
    yield {k: v[rows] for k, v in batch.items()}
