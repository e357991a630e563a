"""The on-disk Grow dataset D_g of one Grow step: chunked, immutable, marked complete.

Layout of a Grow directory (e.g. WORKDIR/grow/g001/):

  chunk-h{host:03d}-{idx:05d}.tfrecord   tf.train.Example records, one file per chunk
  .chunk-h{host:03d}-{idx:05d}.tfrecord.{hex}.tmp   a chunk being written (removed if stale)
  index.npz                              host-side index: example_id, sample_idx, reward, ...
  stats.json                             GrowStats, including the manifest of chunk files
  COMPLETED                              written last, by ``finalize``

Each chunk is written through ``storage.atomic_path`` (a temporary name, fsynced and renamed;
on an object store the object appears when its upload completes): a chunk file exists only
when complete, and a completed chunk is never rewritten. The caller maps chunk ``k`` to a
fixed slice of prompts, so a crashed Grow step resumes at its missing chunks. Readers never
rewrite files; which records an Improve step trains on is ``rest_jax.improve.selection``'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rest_jax import storage
from rest_jax.grow import chunkindex
from rest_jax.grow import integrity
from rest_jax.grow import stats as growstats
from rest_jax.errors import RestJaxError
from rest_jax.grow.stats import GrowStats

COMPLETED, STATS, INDEX = integrity.COMPLETED, integrity.STATS, integrity.INDEX
_CHUNK_RE = re.compile(r"^chunk-h(\d{3})-(\d{5})\.tfrecord$")
_TASK_COUNTER = itertools.count()
_READ_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)

FEATURES = {
    "example_id": tf.io.FixedLenFeature([], tf.int64),
    "sample_idx": tf.io.FixedLenFeature([], tf.int64),
    "inputs": tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
    "targets": tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
    "inputs_pretokenized": tf.io.FixedLenFeature([], tf.string),
    "targets_pretokenized": tf.io.FixedLenFeature([], tf.string),
    "reward": tf.io.FixedLenFeature([], tf.float32),
    "behaviour_logprobs": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    "is_original": tf.io.FixedLenFeature([], tf.int64),
    "grow_step": tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass(frozen=True)
class GrowRecord:
  """One (x, y) pair of D_g with its reward.

  ``inputs`` / ``targets`` are unpadded token ids (a finished sample's targets end with EOS);
  ``behaviour_logprobs`` has one log-prob per target token, from the policy that sampled it.
  An original pair of D has ``sample_idx == -1`` and ``is_original`` True.
  """

  example_id: int
  sample_idx: int
  inputs: Sequence[int]
  targets: Sequence[int]
  inputs_pretokenized: str
  targets_pretokenized: str
  reward: float
  behaviour_logprobs: Sequence[float]
  is_original: bool
  grow_step: int

  def serialize(self) -> bytes:
    """The record as a serialized tf.train.Example."""
    ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))
    floats = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=v))
    text = lambda s: tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode("utf-8")]))
    feature = {
        "example_id": ints([int(self.example_id)]),
        "sample_idx": ints([int(self.sample_idx)]),
        "inputs": ints(np.asarray(self.inputs, dtype=np.int64).tolist()),
        "targets": ints(np.asarray(self.targets, dtype=np.int64).tolist()),
        "inputs_pretokenized": text(self.inputs_pretokenized),
        "targets_pretokenized": text(self.targets_pretokenized),
        "reward": floats([float(self.reward)]),
        "behaviour_logprobs": floats(np.asarray(self.behaviour_logprobs, np.float32).tolist()),
        "is_original": ints([int(bool(self.is_original))]),
        "grow_step": ints([int(self.grow_step)]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

  @classmethod
  def from_parsed(cls, ex: Mapping[str, np.ndarray]) -> GrowRecord:
    """From a numpy dict parsed with ``FEATURES``."""
    return cls(example_id=int(ex["example_id"]), sample_idx=int(ex["sample_idx"]),
               inputs=np.asarray(ex["inputs"], np.int64),
               targets=np.asarray(ex["targets"], np.int64),
               inputs_pretokenized=bytes(ex["inputs_pretokenized"]).decode("utf-8"),
               targets_pretokenized=bytes(ex["targets_pretokenized"]).decode("utf-8"),
               reward=float(ex["reward"]),
               behaviour_logprobs=np.asarray(ex["behaviour_logprobs"], np.float32),
               is_original=bool(ex["is_original"]), grow_step=int(ex["grow_step"]))

  def check(self) -> None:
    """Raises ValueError on an inconsistent record (a bug in the caller)."""
    if len(self.behaviour_logprobs) != len(self.targets):
      raise ValueError(f"record ({self.example_id}, {self.sample_idx}): "
                       f"{len(self.behaviour_logprobs)} behaviour log-probs for "
                       f"{len(self.targets)} target tokens")
    if bool(self.is_original) != (self.sample_idx == -1):
      raise ValueError(f"record ({self.example_id}, {self.sample_idx}): is_original="
                       f"{self.is_original} but originals (only) have sample_idx -1")
    if not 0.0 <= float(self.reward) <= 1.0:
      raise ValueError(f"record ({self.example_id}, {self.sample_idx}): reward {self.reward} "
                       "is outside [0, 1] (score rewards with rest_jax.rewards.score)")


def chunk_name(host_id: int, chunk_index: int) -> str:
  return f"chunk-h{host_id:03d}-{chunk_index:05d}.tfrecord"


def chunk_files(directory: str) -> list[str]:
  """Names of every completed chunk file in ``directory`` (all hosts), sorted."""
  return [n for n in storage.listdir(directory) if _CHUNK_RE.match(n)]


def _chunk_temps(directory: str, host_id: int | None = None) -> list[str]:
  """Temporary files of unfinished chunk writes (of one host, or of all)."""
  prefix = "chunk-h" if host_id is None else f"chunk-h{host_id:03d}-"
  return [n for n in storage.listdir(directory)
          if (target := storage.temp_target(n)) and target.startswith(prefix)
          and _CHUNK_RE.match(target)]


class GrowWriter:
  """Writes this host's chunks of one Grow dataset; a chunk is the unit of resume."""

  def __init__(self, directory: str, *, host_id: int = 0):
    """Creates ``directory`` and removes this host's stale .tmp files from a crashed attempt."""
    if not 0 <= host_id <= 999:
      raise ValueError(f"host_id {host_id} must be in [0, 999]")
    self.directory = directory
    self.host_id = host_id
    storage.makedirs(directory)
    for name in _chunk_temps(directory, host_id):
      storage.remove(storage.join(directory, name))

  def completed_chunks(self) -> set[int]:
    """Indices of this host's completed chunks."""
    found = set()
    for name in chunk_files(self.directory):
      host, index = _CHUNK_RE.match(name).groups()
      if int(host) == self.host_id:
        found.add(int(index))
    return found

  def write_chunk(self, chunk_index: int, records: Sequence[GrowRecord]) -> str:
    """Writes chunk ``chunk_index`` atomically and returns its path.

    Args:
      chunk_index: the chunk's index (0-based, in [0, 99999]) within this host's prompts.
      records: every record of the chunk's prompts: N samples per prompt and the originals.
    Raises:
      RestJaxError: the chunk is already complete (chunks are immutable), or the Grow dataset
        was already finalized.
    """
    if not 0 <= chunk_index <= 99_999:
      raise ValueError(f"chunk_index {chunk_index} must be in [0, 99999]")
    final = storage.join(self.directory, chunk_name(self.host_id, chunk_index))
    if is_complete(self.directory):
      raise RestJaxError(f"{self.directory} is already finalized (COMPLETED exists); a Grow "
                         "dataset is immutable. Delete the directory to regenerate it.")
    if storage.exists(final):
      raise RestJaxError(f"chunk {final} is already complete and chunks are never rewritten; "
                         "skip the indices in completed_chunks(), or delete the file to "
                         "regenerate it.")
    for record in records:
      record.check()
    with storage.atomic_path(final, overwrite=False) as tmp:
      with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
          writer.write(record.serialize())
        writer.flush()
    return final


def _corrupt(directory: str, name: str, error: Exception) -> RestJaxError:
  return RestJaxError(
      f"Grow chunk {storage.join(directory, name)} is corrupt, truncated or missing "
      f"({str(error).strip().splitlines()[-1][:160]}). Delete that chunk file (and, if present, "
      f"{COMPLETED}, {STATS} and {INDEX} in the same directory) and rerun: the Grow step "
      "regenerates the missing chunk.")


def verify_chunks(directory: str) -> dict[str, int]:
  """Reads every completed chunk; returns file name -> record count.

  Raises:
    RestJaxError: a chunk is corrupt (names the file and the fix).
  """
  counts = {}
  for name in chunk_files(directory):
    try:
      counts[name] = int(chunkindex.build_rows(storage.join(directory, name)).size)
    except _READ_ERRORS as e:
      raise _corrupt(directory, name, e) from None
  return counts


def is_complete(directory: str) -> bool:
  """Whether ``finalize`` has finished for this Grow dataset."""
  return storage.exists(storage.join(directory, COMPLETED))


def finalize(directory: str, *, histogram_bins: int = 20,
             adaptive: dict[str, Any] | None = None) -> GrowStats:
  """Verifies every completed chunk, then writes index.npz, stats.json and COMPLETED (last).

  Host 0 calls this once every host has written its chunks (and ``index_chunks``). It reads
  the per-chunk index files (``chunkindex``; built from a chunk where missing) one chunk at a
  time, twice: memory is one chunk's index, the per-prompt id list (8 bytes per prompt, for the
  duplicate check) and the stats' fixed-size histograms, whatever the number of records. Calling
  it on a finalized dataset returns the stored stats. ``adaptive``: the settings of an adaptive
  Grow (``stats.budget_summary``'s keyword arguments); its budget goes into the stats.

  Raises:
    RestJaxError: no chunks, an unfinished (.tmp) chunk, a corrupt chunk, or a record that
      appears twice (the step was resumed with a different host count or chunk size).
  """
  if is_complete(directory):
    return read_stats(directory)
  names = chunk_files(directory)
  if not names:
    raise RestJaxError(f"no completed Grow chunks in {directory}; run the Grow step "
                       "(rerun `rest-jax run`) to generate them.")
  pending = _chunk_temps(directory)
  if pending:
    raise RestJaxError(f"{directory} holds unfinished chunk writes {pending}: a Grow worker "
                       "crashed mid-chunk. Rerun the Grow step; it removes them and regenerates "
                       "those chunks before finalizing.")
  counts, manifest, prompts = [], {}, []
  acc = growstats.Accumulator(histogram_bins)
  steps: set[int] = set()
  for name, rows in _indexed(directory, names):  # Pass 1: one chunk's index at a time.
    counts.append(rows.size)
    manifest[name] = integrity.chunk_entry(directory, name, rows.size)
    acc.add(rows["reward"], rows["is_original"].astype(bool))
    prompts.append(np.unique(rows["example_id"]))
    steps.update(np.unique(rows["grow_step"]).tolist())
  if sum(counts) == 0:
    raise RestJaxError(f"the Grow chunks in {directory} hold no records: the prompt set was "
                       "empty. Check the task's train split.")
  ids, seen = np.unique(np.concatenate(prompts), return_counts=True)
  shared, keys = ids[seen > 1], []  # Prompts found in two chunks (none when written by Grow).
  for _, rows in _indexed(directory, names):  # Pass 2: exact std and quantiles; duplicates.
    acc.refine(rows["reward"], rows["is_original"].astype(bool))
    inside = np.isin(rows["example_id"], shared)
    keys.append(np.stack([rows["example_id"][inside], rows["sample_idx"][inside]], axis=1))
    if not inside.all():
      keys.append(np.stack([rows["example_id"][~inside], rows["sample_idx"][~inside]], axis=1))
      _check_unique(keys.pop(), directory)
  _check_unique(np.concatenate(keys), directory)
  stats = acc.result(grow_step=steps.pop() if len(steps) == 1 else -1, chunks=manifest)
  if adaptive:
    budget = growstats.budget_summary((r for _, r in _indexed(directory, names)), **adaptive)
    stats = dataclasses.replace(stats, adaptive=budget)
  with storage.open_write(storage.join(directory, INDEX), "wb") as f:
    integrity.write_index(f, names, counts, lambda: (r for _, r in _indexed(directory, names)))
  storage.write_text(storage.join(directory, STATS), stats.to_json())
  storage.write_text(storage.join(directory, COMPLETED), "ok\n")  # Last: marks the rest.
  return stats


def _indexed(directory: str, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(chunk, its ``chunkindex.ROW`` rows), one chunk at a time; writes missing index files."""
  for name in names:
    rows = chunkindex.read_rows(directory, name)
    index = storage.join(directory, chunkindex.index_name(name))
    if not storage.exists(index):
      storage.write_bytes(index, chunkindex.to_bytes(rows))
    yield name, rows


def _check_unique(keys: np.ndarray, directory: str) -> None:
  """Raises RestJaxError when a (example_id, sample_idx) row of ``keys`` `[n, 2]` repeats."""
  if not keys.size:
    return
  unique, counts = np.unique(keys, axis=0, return_counts=True)
  if (counts > 1).any():
    eid, sidx = unique[np.argmax(counts > 1)]
    raise RestJaxError(
        f"record (example_id={eid}, sample_idx={sidx}) appears {counts.max()} times in "
        f"{directory}: the Grow step was resumed with a different number of hosts or chunk "
        "size. Delete the directory and rerun the Grow step.")


def index_chunks(directory: str, *, host_id: int, num_hosts: int) -> None:
  """Writes the per-chunk index files of this host's share of the completed chunks (every host
  calls it before host 0's ``finalize``, which then reads the small index files only)."""
  chunkindex.index_chunks(directory, chunk_files(directory), host_id=host_id,
                          num_hosts=num_hosts)


def _require_complete(directory: str) -> None:
  if not is_complete(directory):
    raise RestJaxError(f"Grow dataset {directory} is not finalized (no {COMPLETED} marker): "
                       "the Grow step did not finish. Rerun `rest-jax run` to complete it.")


def read_stats(directory: str) -> GrowStats:
  """The stats of a finalized Grow dataset."""
  _require_complete(directory)
  return integrity.read_stats_file(directory)


def load_index(directory: str) -> dict[str, np.ndarray]:
  """Host-side index of a finalized dataset, `[count]` each: example_id, sample_idx, reward
  (float32), is_original (bool), chunk (int32 into "files"), position (record number in it)."""
  _require_complete(directory)
  return integrity.read_index_file(directory)


def read_records(directory: str, *, files: Sequence[str] | None = None) -> Iterator[GrowRecord]:
  """Every record of the given chunk files (default: all completed chunks), in file order."""
  for name in files if files is not None else chunk_files(directory):
    dataset = tf.data.TFRecordDataset(storage.join(directory, name))
    try:
      for ex in dataset.map(lambda s: tf.io.parse_single_example(s, FEATURES)) \
          .as_numpy_iterator():
        yield GrowRecord.from_parsed(ex)
    except _READ_ERRORS as e:
      raise _corrupt(directory, name, e) from None


def read_record(directory: str, name: str, position: int) -> GrowRecord:
  """Record number ``position`` of chunk file ``name``."""
  dataset = tf.data.TFRecordDataset(storage.join(directory, name)).skip(position).take(1)
  try:
    for serialized in dataset.as_numpy_iterator():
      return GrowRecord.from_parsed({k: v.numpy() for k, v in tf.io.parse_single_example(
          serialized, FEATURES).items()})
  except _READ_ERRORS as e:
    raise _corrupt(directory, name, e) from None
  raise RestJaxError(f"{storage.join(directory, name)} has no record {position}; the file "
                     "changed after finalize. Delete the directory and rerun the Grow step.")


def grow_task(directory: str, *,
              output_features: Mapping[str, seqio.Feature]) -> seqio.Task:
  """Every record of a finalized Grow dataset, unfiltered, as an (unregistered) seqio Task.

  Selection (threshold, originals, cap, mixture) is ``rest_jax.improve.selection``'s job; this
  only reads, in chunk-file order.

  Args:
    directory: the Grow directory.
    output_features: the prompt task's "inputs" / "targets" features (for the vocabulary).
  Returns:
    A Task with one split, "train", whose examples have "inputs" / "targets" int32 `[len]`,
    "reward" f32, "behaviour_logprobs" f32 `[target len]`, "is_original" int32, "example_id",
    "sample_idx" and "grow_step" int64, and the two "_pretokenized" texts.
  Raises:
    RestJaxError: not finalized, or a chunk changed since finalize.
  """
  stats = read_stats(directory)
  files = integrity.check_manifest(directory, stats)

  def cast(ex):
    ex = dict(ex)
    for key in ("inputs", "targets", "is_original"):
      ex[key] = tf.cast(ex[key], tf.int32)
    return ex

  source = seqio.TFExampleDataSource({"train": files}, FEATURES,
                                     num_input_examples={"train": stats.count})
  tail = re.sub(r"[^\w]", "_", os.path.basename(os.path.normpath(directory)))
  name = f"rest_jax_grow_{tail}_{next(_TASK_COUNTER)}"
  return seqio.Task(name, source=source, output_features=dict(output_features),
                    preprocessors=[seqio.map_over_dataset(cast)])
