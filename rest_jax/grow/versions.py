"""Versioned reward columns of a finalized Grow set (``rest-jax rescore``).

Grow writes each record's reward into its chunk (version 0). Re-scoring the same samples with
another reward never rewrites a chunk: version v >= 1 lies beside each chunk file as

  chunk-h{host}-{idx}.rewards-v{v}.npy   float32 `[records]`, in the chunk's record order
  rewards.json                           the manifest: every version's reward spec, name, times,
                                         counts and its GrowStats (mean, quantiles, histogram)

Each side file is committed whole (``storage.write_bytes``); a version is recorded as
``"status": "complete"`` in the manifest only after every chunk's side file exists, so a reward
that fails midway leaves the complete versions untouched and the new one "pending": rerunning
the same rescore continues at the chunks without a side file (a rescore with another reward
takes the pending number over and starts it again). The manifest lives in the Grow folder, so
a Grow set copied into another workdir keeps its versions.

Readers (``ImproveConfig.reward_version``): the schedules (``grow.rewards``), the selection
(``improve.selected`` and ``improve.selection``) and the losses read the version's column;
``chunk_rewards`` is the one reader of the side files.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow.stats import Accumulator, GrowStats

MANIFEST = "rewards.json"
RewardCall = Callable[[Sequence[str], Sequence[str], Sequence[str] | None], np.ndarray]


def side_name(chunk: str, version: int) -> str:
  """``chunk-h000-00001.tfrecord`` -> ``chunk-h000-00001.rewards-v2.npy``."""
  return chunk[:-len(".tfrecord")] + f".rewards-v{version}.npy"


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of a Grow folder: {"versions": {"1": {...}, ...}} (empty without one)."""
  path = storage.join(directory, MANIFEST)
  if not storage.exists(path):
    return {"versions": {}}
  return storage.read_json(path, keys=("versions",),
                           fix=f"restore it or delete it and every *.rewards-v*.npy in "
                               f"{directory}, then rerun `rest-jax rescore`")


def _write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  storage.write_json(storage.join(directory, MANIFEST), manifest)


def complete_versions(directory: str) -> dict[int, dict[str, Any]]:
  """Version -> manifest entry of every complete version (0, Grow's own rewards, not listed)."""
  return {int(v): e for v, e in read_manifest(directory)["versions"].items()
          if e.get("status") == "complete"}


def require_version(directory: str, version: int) -> None:
  """Raises RestJaxError unless ``version`` is 0 or a complete version of ``directory``."""
  if version == 0:
    return
  done = complete_versions(directory)
  if version not in done:
    known = ", ".join(str(v) for v in [0] + sorted(done))
    raise RestJaxError(
        f"reward version {version} is not recorded for the Grow set {directory} (recorded: "
        f"{known}); set ImproveConfig.reward_version to a recorded one, or write it with "
        "`rest-jax rescore WORKDIR --reward R`.")


def chunk_rewards(directory: str, chunk: str, version: int, records: int) -> np.ndarray:
  """float32 `[records]`: the rewards of version ``version`` of one chunk (0: None here; the
  callers read the chunk's own column).

  Raises:
    RestJaxError: the side file is missing, damaged or of another length.
  """
  path = storage.join(directory, side_name(chunk, version))
  try:
    values = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise RestJaxError(f"reward version {version} of {path} is missing or damaged "
                       f"({type(e).__name__}); rerun `rest-jax rescore` with that version's "
                       "reward to rewrite it.") from None
  if values.shape != (records,) or values.dtype != np.float32:
    raise RestJaxError(f"{path} holds {values.dtype} {values.shape}, not float32 ({records},); "
                       "delete it and rerun `rest-jax rescore` with that version's reward.")
  return values


def rows_with_version(directory: str, chunk: str, rows: np.ndarray, version: int) -> np.ndarray:
  """A chunk's index rows (``chunkindex.ROW`` `[records]`) with the reward of ``version``."""
  if version == 0:
    return rows
  rows = rows.copy()
  rows["reward"] = chunk_rewards(directory, chunk, version, rows.size)
  return rows


def version_stats(directory: str, version: int) -> GrowStats:
  """The GrowStats of a finalized Grow set under reward ``version`` (0: stats.json)."""
  stats = growdata.read_stats(directory)
  if version == 0:
    return stats
  require_version(directory, version)
  values = dict(complete_versions(directory)[version]["stats"], chunks=stats.chunks)
  return GrowStats.from_dict(values)


def index_rewards(directory: str, index: Mapping[str, np.ndarray], version: int) -> np.ndarray:
  """float32 `[records]`: ``growdata.load_index``'s reward column under ``version``."""
  if version == 0:
    return np.asarray(index["reward"], np.float32)
  files = [str(f) for f in index["files"]]
  counts = np.bincount(index["chunk"], minlength=len(files))
  parts = [chunk_rewards(directory, f, version, int(n)) for f, n in zip(files, counts)]
  return np.concatenate(parts) if parts else np.zeros([0], np.float32)


def choose_version(directories: Sequence[str], spec: str) -> int:
  """The version number a rescore with ``spec`` writes in every one of ``directories``: a
  pending version (same reward: continued; another: taken over), else one past the highest."""
  pending, highest = [], 0
  for directory in directories:
    for v, entry in read_manifest(directory)["versions"].items():
      highest = max(highest, int(v))
      if entry.get("status") != "complete":
        pending.append((entry.get("reward") != spec, int(v)))
  return min(pending)[1] if pending else highest + 1


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def start_version(directory: str, version: int, *, spec: str, name: str,
                  reward_range: Sequence[float]) -> None:
  """Records ``version`` as pending (host 0, before any side file); a pending entry of another
  reward is replaced and its side files removed."""
  manifest = read_manifest(directory)
  entry = manifest["versions"].get(str(version))
  if entry is not None and entry.get("status") == "complete":
    raise RestJaxError(f"reward version {version} of {directory} is complete; versions are "
                       "immutable (a new rescore writes the next number).")
  if entry is not None and entry.get("reward") == spec and entry.get("name") == name:
    return  # Continued: its side files are kept.
  for chunk in growdata.read_stats(directory).chunks:
    storage.remove(storage.join(directory, side_name(chunk, version)))
  manifest["versions"][str(version)] = {
      "version": version, "name": name, "reward": spec, "range": list(reward_range),
      "started": _now(), "status": "pending"}
  _write_manifest(directory, manifest)


def score_chunks(directory: str, chunks: Iterable[str], *, version: int, reward: RewardCall,
                 references: Mapping[int, str], batch_size: int = 1024) -> int:
  """Writes the side file of each of ``chunks`` that lacks one; returns how many it wrote.

  One chunk's records are in memory at a time (read with tf.data), scored ``batch_size``
  hypotheses per reward call. An original pair is scored against its own target.

  Args:
    references: example_id -> reference text of every prompt in ``chunks``.
  Raises:
    RestJaxError: the reward fails validation (NaN, outside [0, 1]: names the fix), or a
      record's prompt has no reference.
  """
  written = 0
  stats = growdata.read_stats(directory)
  for chunk in chunks:
    path = storage.join(directory, side_name(chunk, version))
    if storage.exists(path):
      continue
    sources, hyps, refs = [], [], []
    for record in growdata.read_records(directory, files=[chunk]):
      if record.is_original:
        ref = record.targets_pretokenized
      elif record.example_id in references:
        ref = references[record.example_id]
      else:
        raise RestJaxError(f"prompt {record.example_id} of {chunk} in {directory} has no "
                           "reference in the task's train or unlabeled split; rescore with the "
                           "task the Grow set was sampled from.")
      sources.append(record.inputs_pretokenized)
      hyps.append(record.targets_pretokenized)
      refs.append(ref)
    if len(hyps) != stats.chunks[chunk]["records"]:
      raise RestJaxError(f"{chunk} in {directory} holds {len(hyps)} records, not the "
                         f"{stats.chunks[chunk]['records']} it had when finalized; delete the "
                         "Grow set and rerun its Grow step.")
    values = [np.asarray(reward(sources[i:i + batch_size], hyps[i:i + batch_size],
                                refs[i:i + batch_size]), np.float32)
              for i in range(0, len(hyps), batch_size)]
    buffer = io.BytesIO()
    np.save(buffer, np.concatenate(values) if values else np.zeros([0], np.float32),
            allow_pickle=False)
    storage.write_bytes(path, buffer.getvalue())
    written += 1
  return written


def finish_version(directory: str, version: int) -> dict[str, Any]:
  """Host 0, once every chunk has its side file: the version's GrowStats (exact, streamed one
  chunk at a time), then the manifest entry marked complete (last). Returns the entry."""
  stats = growdata.read_stats(directory)
  names = sorted(stats.chunks)
  missing = [n for n in names
             if not storage.exists(storage.join(directory, side_name(n, version)))]
  if missing:
    raise RestJaxError(f"reward version {version} of {directory} lacks {len(missing)} chunks "
                       f"(e.g. {missing[0]}); rerun the same `rest-jax rescore` to finish it.")

  def chunks():
    for name in names:
      yield rows_with_version(directory, name, chunkindex.read_rows(directory, name), version)

  acc = Accumulator()
  for rows in chunks():
    acc.add(rows["reward"], rows["is_original"].astype(bool))
  for rows in chunks():
    acc.refine(rows["reward"], rows["is_original"].astype(bool))
  result = acc.result(grow_step=stats.grow_step)
  values = {k: v for k, v in dataclasses.asdict(result).items()
            if k not in ("chunks", "adaptive")}
  manifest = read_manifest(directory)
  entry = dict(manifest["versions"][str(version)], status="complete", completed=_now(),
               records=stats.count, chunks=len(names), stats=values)
  manifest["versions"][str(version)] = entry
  _write_manifest(directory, manifest)
  return entry
