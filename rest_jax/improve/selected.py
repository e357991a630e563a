"""The Improve set of one Improve step, selected by every host together and written to disk.

``select_to_disk`` applies ``selection``'s rules (threshold, originals, prompt filters, dedup,
per-prompt top-k) to the Grow sets of a mixture without any host holding all their records, as
a two-stage external shuffle over the per-chunk indexes (``rest_jax.grow.chunkindex``):

1. scatter: host h reads the index of every (Grow set, chunk) pair j with j % H == h, one chunk
   at a time, drops the records no rule can keep, and spills runs of at most ``SPILL_ROWS``
   rows sorted by bucket ``hash(example_id) % B`` (``run-h{h}-{r}.bin``, a bucket offset table
   then the rows).
2. reduce: host h takes the buckets b with b % H == h, reads bucket b's slice of every run
   (ranged reads), applies the rules (every record of a prompt is in its bucket, so the per-prompt
   rules are exact), orders the kept records by (example_id, sample_idx, Grow set) and writes them
   as ``bucket-{b}.bin`` (``SELECTED_ROW``: Grow set, chunk file, byte offset, byte length).
3. host 0 merges the per-host counts into ``selection.json`` (written last: the marker).

B = ceil(records / ``BUCKET_ROWS``) depends only on the Grow sets, and the bucket of a record
only on its example_id, so the canonical order (bucket, example_id, sample_idx, Grow set) and
therefore every batch are the same whatever the number of hosts (or of Grow chunk files).
Host memory: one chunk index plus one spill run (``SPILL_ROWS`` x 57 bytes) while scattering,
one bucket (about ``BUCKET_ROWS`` x 57 bytes) while reducing; per-source thresholds hold one
float per prompt. Nothing grows with the Grow set beyond the bucket count table (8 bytes per
bucket).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Callable, Sequence

import numpy as np

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import versions
from rest_jax.improve import selection
from rest_jax.improve.schedules import Threshold

BUCKET_ROWS = 1 << 20
SPILL_ROWS = 1 << 20
RUN_ROW = np.dtype(chunkindex.ROW.descr + [("source", "<i4"), ("file", "<i4")])
SELECTED_ROW = np.dtype([("source", "<i4"), ("file", "<i4"), ("offset", "<i8"),
                         ("length", "<i8"), ("reward", "<f4")])
SELECTION = "selection.json"
ROW_FORMAT = 2  # SELECTED_ROW with the (versioned) reward; a selection of format 1 is rebuilt.


@dataclasses.dataclass(frozen=True)
class Rules:
  """The selection rules of one Improve step (``selection.select_mixture``'s arguments)."""

  threshold: Threshold
  include_originals: bool = True
  max_per_prompt: int = 0
  deduplicate: bool = False
  drop_all_pass: bool = False
  drop_all_fail: bool = False
  reward_version: int = 0  # The reward column every rule reads (``grow.versions``).


@dataclasses.dataclass(frozen=True)
class Selection:
  """A written Improve set: ``bucket_counts`` int64 `[B]` kept records per bucket."""

  directory: str
  sources: tuple[str, ...]
  files: tuple[tuple[str, ...], ...]
  bucket_counts: np.ndarray
  dropped_all_pass: int
  dropped_all_fail: int
  fingerprint: str

  @property
  def count(self) -> int:
    return int(self.bucket_counts.sum())

  def bucket_path(self, bucket: int) -> str:
    return storage.join(self.directory, f"bucket-{bucket:06d}.bin")

  def chunk_path(self, source: int, file: int) -> str:
    return storage.join(self.sources[source], self.files[source][file])


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: uint64 `[n]` -> well-mixed uint64 `[n]`."""
  z = np.asarray(x).astype(np.uint64)
  with np.errstate(over="ignore"):
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def bucket_of(example_id: np.ndarray, num_buckets: int) -> np.ndarray:
  """int64 `[n]`: the bucket of each record, a function of its example_id only."""
  return (mix64(np.asarray(example_id, np.int64).view(np.uint64)) %
          np.uint64(num_buckets)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _Plan:
  sources: tuple[str, ...]
  files: tuple[tuple[str, ...], ...]
  sizes: tuple[dict[str, int], ...]
  num_buckets: int


def _plan(directories: Sequence[str]) -> _Plan:
  stats = [growdata.read_stats(d) for d in directories]
  total = sum(s.count for s in stats)
  return _Plan(tuple(directories), tuple(tuple(sorted(s.chunks)) for s in stats),
               tuple({k: int(v["bytes"]) for k, v in s.chunks.items()} for s in stats),
               max(1, math.ceil(total / BUCKET_ROWS)))


def _chunk_rows(plan: _Plan, source: int, file: int, version: int = 0) -> np.ndarray:
  directory, name = plan.sources[source], plan.files[source][file]
  size = storage.size(storage.join(directory, name))
  if size != plan.sizes[source][name]:
    raise RestJaxError(
        f"Grow chunk {storage.join(directory, name)} is "
        f"{'missing' if size is None else f'{size} bytes'} but was {plan.sizes[source][name]} "
        f"bytes when finalized. Delete it together with COMPLETED, stats.json and index.npz in "
        f"{directory} and rerun: the Grow step regenerates it.")
  rows = versions.rows_with_version(directory, name, chunkindex.read_rows(directory, name),
                                   version)
  out = np.zeros(rows.shape, RUN_ROW)
  for key in chunkindex.ROW.names:
    out[key] = rows[key]
  out["source"], out["file"] = source, file
  return out


def _table(rows: np.ndarray, rules: Rules) -> dict[str, np.ndarray]:
  """``selection.record_table`` columns of RUN_ROW rows (any mix of Grow sets), `[n]` each."""
  t = selection.record_table(0, rows["example_id"], rows["sample_idx"], rows["reward"],
                             rows["is_original"].astype(bool), threshold=rules.threshold,
                             include_originals=rules.include_originals)
  t["source"] = rows["source"].astype(np.int64)
  t["keep"] &= ~(t["is_original"] & (t["source"] > 0))
  return t


def _may_keep(rows: np.ndarray, rules: Rules) -> np.ndarray:
  """bool `[n]`: the rows any rule may still need (kept by steps 1-2, or judged by a filter)."""
  t = _table(rows, rules)
  need = t["keep"]
  if rules.drop_all_pass or rules.drop_all_fail:
    need = need | ((t["source"] == 0) & ~t["is_original"])
  return need


def _write_run(out_dir: str, name: str, rows: np.ndarray, num_buckets: int) -> None:
  buckets = bucket_of(rows["example_id"], num_buckets)
  order = np.argsort(buckets, kind="stable")
  offsets = np.searchsorted(buckets[order], np.arange(num_buckets + 1)).astype("<i8")
  storage.write_bytes(storage.join(out_dir, name), offsets.tobytes() + rows[order].tobytes())


def scatter(directories: Sequence[str], out_dir: str, rules: Rules, *, host_id: int,
            num_hosts: int) -> None:
  """Stage 1 for this host (see the module docstring)."""
  plan = _plan(directories)
  items = [(s, f) for s in range(len(plan.sources)) for f in range(len(plan.files[s]))]
  pending, num_rows, runs, best = [], 0, 0, -math.inf
  for j, (source, file) in enumerate(items):
    if j % num_hosts != host_id:
      continue
    rows = _chunk_rows(plan, source, file, rules.reward_version)
    eligible = ~rows["is_original"].astype(bool) | (rules.include_originals and source == 0)
    if eligible.any():
      best = max(best, float(rows["reward"][eligible].max()))
    rows = rows[_may_keep(rows, rules)]
    pending.append(rows)
    num_rows += rows.size
    if num_rows >= SPILL_ROWS:
      _write_run(out_dir, f"run-h{host_id:03d}-{runs:05d}.bin", np.concatenate(pending),
                 plan.num_buckets)
      pending, num_rows, runs = [], 0, runs + 1
  if num_rows:
    _write_run(out_dir, f"run-h{host_id:03d}-{runs:05d}.bin", np.concatenate(pending),
               plan.num_buckets)
  storage.write_json(storage.join(out_dir, f"scatter-h{host_id:03d}.json"),
                     {"best_eligible": best if math.isfinite(best) else None})


def reduce(directories: Sequence[str], out_dir: str, rules: Rules, *, host_id: int,
           num_hosts: int) -> None:
  """Stage 2 for this host (see the module docstring)."""
  plan = _plan(directories)
  runs = [n for n in storage.listdir(out_dir) if n.startswith("run-h") and n.endswith(".bin")]
  header = 8 * (plan.num_buckets + 1)
  counts, num_pass, num_fail = {}, 0, 0
  for bucket in range(host_id, plan.num_buckets, num_hosts):
    parts = []
    for name in runs:
      with storage.open_read(storage.join(out_dir, name)) as f:
        f.seek(8 * bucket)
        start, stop = (int(v) for v in np.frombuffer(f.read(16), "<i8"))
        if stop > start:
          f.seek(header + start * RUN_ROW.itemsize)
          parts.append(np.frombuffer(f.read((stop - start) * RUN_ROW.itemsize), RUN_ROW))
    rows = np.concatenate(parts) if parts else np.zeros([0], RUN_ROW)
    keep = np.zeros([0], bool)
    if rows.size:
      t = _table(rows, rules)
      keep, p, q = selection.keep_records(
          t, max_per_prompt=rules.max_per_prompt, drop_all_pass=rules.drop_all_pass,
          drop_all_fail=rules.drop_all_fail,
          token_key=rows["tokens"] if rules.deduplicate else None)
      num_pass, num_fail = num_pass + p, num_fail + q
    kept = rows[keep]
    kept = kept[np.lexsort((kept["source"], kept["sample_idx"], kept["example_id"]))]
    out = np.zeros(kept.shape, SELECTED_ROW)
    for key in SELECTED_ROW.names:
      out[key] = kept[key]
    storage.write_bytes(storage.join(out_dir, f"bucket-{bucket:06d}.bin"), out.tobytes())
    counts[str(bucket)] = int(out.size)
  storage.write_json(storage.join(out_dir, f"counts-h{host_id:03d}.json"),
                     {"buckets": counts, "dropped_all_pass": num_pass,
                      "dropped_all_fail": num_fail})


def merge(directories: Sequence[str], out_dir: str, rules: Rules) -> None:
  """Stage 3 (host 0): sums the per-host counts, removes the runs, writes ``selection.json``."""
  plan = _plan(directories)
  names = storage.listdir(out_dir)
  counts = np.full([plan.num_buckets], -1, np.int64)
  num_pass = num_fail = 0
  best = [storage.read_json(storage.join(out_dir, n))["best_eligible"] for n in names
          if n.startswith("scatter-h")]
  for name in (n for n in names if n.startswith("counts-h")):
    part = storage.read_json(storage.join(out_dir, name))
    for bucket, count in part["buckets"].items():
      counts[int(bucket)] = count
    num_pass += part["dropped_all_pass"]
    num_fail += part["dropped_all_fail"]
  if (counts < 0).any():
    raise RestJaxError(f"the selection in {out_dir} lacks bucket {int(np.argmax(counts < 0))}: "
                       "a host did not finish it. Delete the folder and rerun.")
  for name in names:
    if name.startswith(("run-h", "scatter-h", "counts-h")):
      storage.remove(storage.join(out_dir, name))
  finite = [b for b in best if b is not None]
  record = {"sources": list(plan.sources), "files": [list(f) for f in plan.files],
            "bucket_counts": counts.tolist(), "dropped_all_pass": num_pass,
            "dropped_all_fail": num_fail, "best_eligible": max(finite) if finite else None,
            "threshold": rules.threshold.describe(), "row_format": ROW_FORMAT,
            "reward_version": rules.reward_version}
  storage.write_json(storage.join(out_dir, SELECTION), record)


def load(out_dir: str, directories: Sequence[str]) -> tuple[Selection, dict]:
  """The Selection of a finished ``select_to_disk`` over ``directories`` (their current paths:
  a moved workdir still reads) and its raw record."""
  path = storage.join(out_dir, SELECTION)
  record = storage.read_json(path, keys=("sources", "files", "bucket_counts"),
                             fix=f"delete {out_dir} and rerun: the selection is rebuilt.")
  if len(record["sources"]) != len(directories):
    raise RestJaxError(f"{path} selects from {len(record['sources'])} Grow sets, not "
                       f"{len(directories)}; delete {out_dir} and rerun: it is rebuilt.")
  content = {k: v for k, v in record.items() if k not in ("sources", "row_format")
             and (k != "reward_version" or v)}
  digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
  return Selection(out_dir, tuple(directories), tuple(tuple(f) for f in record["files"]),
                   np.asarray(record["bucket_counts"], np.int64), record["dropped_all_pass"],
                   record["dropped_all_fail"], digest), record


def select_to_disk(directories: Sequence[str], out_dir: str, rules: Rules, *, host_id: int = 0,
                   num_hosts: int = 1,
                   barrier: Callable[[str], None] = lambda name: None) -> Selection:
  """Writes (or, when ``selection.json`` exists, reuses) the Improve set of ``directories``.

  Every host calls it with the same arguments and its own ``host_id``; ``barrier(name)`` waits
  for all hosts (``distributed.barrier``).

  Args:
    directories: finalized Grow directories, the current step's first.
    out_dir: the folder of this Improve step's selection.
    rules: the selection rules.
  Returns:
    the Selection.
  Raises:
    RestJaxError: nothing is kept (names the threshold, the best reward or the prompt filters,
      and the fix), or a chunk changed since finalize.
  """
  if not _current(out_dir, rules):
    if host_id == 0:
      storage.rmtree(out_dir)
      storage.makedirs(out_dir)
    barrier(f"{out_dir} cleared")
    scatter(directories, out_dir, rules, host_id=host_id, num_hosts=num_hosts)
    barrier(f"{out_dir} scattered")
    reduce(directories, out_dir, rules, host_id=host_id, num_hosts=num_hosts)
    barrier(f"{out_dir} reduced")
    if host_id == 0:
      merge(directories, out_dir, rules)
    barrier(f"{out_dir} merged")
  result, record = load(out_dir, directories)
  if result.count == 0:
    raise _nothing_kept(rules, directories, record)
  return result


def _current(out_dir: str, rules: Rules) -> bool:
  """Whether ``out_dir`` holds a finished selection of this row format and reward version."""
  path = storage.join(out_dir, SELECTION)
  if not storage.exists(path):
    return False
  record = storage.read_json(path, keys=(), fix=f"delete {out_dir} and rerun: it is rebuilt.")
  return (record.get("row_format") == ROW_FORMAT and
          record.get("reward_version", 0) == rules.reward_version)


def _nothing_kept(rules: Rules, directories: Sequence[str], record: dict) -> RestJaxError:
  where = f"threshold {rules.threshold.describe()} keeps no example of {list(directories)}"
  if record["dropped_all_pass"] or record["dropped_all_fail"]:
    return RestJaxError(
        f"{where} after the prompt filters dropped {record['dropped_all_pass']} prompts whose "
        f"samples all pass it and {record['dropped_all_fail']} whose samples all fail it. Turn "
        "the filter off (ImproveConfig.drop_all_pass / drop_all_fail = False) or choose a "
        "threshold that some but not all samples of a prompt pass.")
  best = record.get("best_eligible")
  return RestJaxError(
      f"{where}: the highest eligible reward is {float('nan') if best is None else best:.4f}. "
      "Lower the threshold or choose a schedule relative to the Grow rewards "
      "(ImproveConfig.schedule), or check the reward function.")
