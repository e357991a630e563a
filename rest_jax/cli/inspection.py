"""`rest-jax inspect`: what the Grow steps of a workdir produced, as text or JSON lines.

Both read a Grow set one chunk at a time (the per-chunk index files, ``rest_jax.grow.chunkindex``,
and the chunk files themselves), never its whole index.npz: memory does not grow with the set.

The reward is a proxy (docs/method.md, "Reward-hacking monitor"): looking at the best- and
worst-scored samples next to the reward histogram is the quickest way to notice a reward that is
being gamed.
"""

from __future__ import annotations

import json

import numpy as np

from rest_jax import storage
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import stats as growstats
from rest_jax.grow import versions
from rest_jax.errors import RestJaxError
from rest_jax.grow.dataset import GrowRecord
from rest_jax.pipeline.workdir import Workdir

_TEXT_WIDTH = 70


def grow_dirs(workdir: str) -> list[tuple[int, str]]:
  """(grow step, directory) of every WORKDIR/grow/gNNN directory, by step.

  Raises:
    RestJaxError: the workdir does not exist, or holds no Grow directory.
  """
  wd = Workdir(workdir)
  wd.require_exists()
  found = wd.grow_steps()
  if not found:
    raise RestJaxError(f"no Grow data in {wd.path('grow')}: no Grow step has run yet. Run "
                       "`rest-jax run` with num_grow_steps >= 1 (BC runs first, then Grow).")
  return found


def _clip(text: str) -> str:
  text = json.dumps(text, ensure_ascii=False)
  return text if len(text) <= _TEXT_WIDTH else text[:_TEXT_WIDTH - 4] + '..."'


def _format_record(record: GrowRecord) -> str:
  kind = "original" if record.is_original else f"sample {record.sample_idx}"
  return (f"    reward {record.reward:.4f}  example {record.example_id} ({kind}): "
          f"{_clip(record.inputs_pretokenized)} -> {_clip(record.targets_pretokenized)}")


def _extremes(directory: str, names: list[str], k: int, samples_only: bool
              ) -> tuple[np.ndarray, np.ndarray, float, int]:
  """The ``k`` best and ``k`` worst records of a finalized Grow set, streamed one chunk index at
  a time (memory: one chunk's index plus 2k rows, whatever the number of records).

  Order: reward high to low, then example_id, then sample_idx (a total order); ``samples_only``
  leaves the originals out. Returns the best and the worst, each a structured array `[<=k]` of
  (reward, example_id, sample_idx, chunk, position) in that order (the worst from the lowest
  up); and the originals' reward sum (float64) and count.
  """
  dtype = np.dtype([("reward", "<f4"), ("example_id", "<i8"), ("sample_idx", "<i8"),
                    ("chunk", "<i4"), ("position", "<i8")])
  best = worst = np.zeros([0], dtype)
  original_sum, num_originals = 0.0, 0
  for chunk, name in enumerate(names):
    rows = chunkindex.read_rows(directory, name)
    original = rows["is_original"].astype(bool)
    original_sum += float(rows["reward"][original].astype(np.float64).sum())
    num_originals += int(original.sum())
    pool = np.flatnonzero(~original) if samples_only else np.arange(rows.size)
    part = np.zeros(pool.shape, dtype)
    for key in ("reward", "example_id", "sample_idx"):
      part[key] = rows[key][pool]
    part["chunk"], part["position"] = chunk, pool
    both = np.concatenate([best, worst, part])
    key = both["chunk"].astype(np.int64) * (1 << 40) + both["position"]
    both = both[np.unique(key, return_index=True)[1]]  # A row may be both best and worst.
    order = np.lexsort((both["sample_idx"], both["example_id"], -both["reward"]))
    best, worst = both[order[:k]], both[order[::-1][:k]]
  return best, worst, original_sum, num_originals


def _describe_step(step: int, directory: str, num_examples: int) -> list[str]:
  if not growdata.is_complete(directory):
    chunks = growdata.chunk_files(directory)
    return [f"Grow step {step} ({directory}): NOT finalized, {len(chunks)} chunk(s) written; "
            "rerun `rest-jax run` to finish it."]
  stats = growdata.read_stats(directory)
  names = sorted(stats.chunks)
  best, worst, original_sum, num_originals = _extremes(
      directory, names, max(num_examples, 0), samples_only=bool(stats.num_samples))
  lines = [
      f"Grow step {step} ({directory}): {stats.count} records = {stats.num_samples} samples + "
      f"{stats.num_originals} originals, in {len(stats.chunks)} chunk(s)",
      f"  sample reward: mean {stats.mean:.4f}  std {stats.std:.4f}  min {stats.min:.4f}  "
      f"max {stats.max:.4f}",
      f"  all records: mean {stats.mean_all:.4f}"
      + (f";  originals: mean {original_sum / num_originals:.4f}" if num_originals else ""),
      "  quantiles: " + "  ".join(f"p{float(q) * 100:g} {v:.4f}"
                                  for q, v in stats.quantiles.items()),
      "  histogram:",
  ]
  lines += ["    " + line for line in growstats.histogram_text(stats).splitlines()]
  if stats.adaptive:
    b = stats.adaptive
    lines.append(f"  adaptive sampling: {b['samples_drawn']} samples drawn (fixed "
                 f"N={b['max_samples']}: {b['fixed_samples']}, {100 * b['saved_fraction']:.1f}% "
                 "saved); "
                 f"{b['solved_prompts']} of {b['prompts']} prompts reached {b['min_passing']} "
                 f"samples with reward >= {b['threshold']:g}")
  for v, entry in sorted(versions.complete_versions(directory).items()):
    lines.append(f"  reward version {v} ({entry['name']}: {entry['reward']}): sample reward mean "
                 f"{entry['stats']['mean']:.4f}, {entry['completed']}")
  if num_examples > 0:
    for title, picks in (("best", best), ("worst", worst)):
      lines.append(f"  {title} {'samples' if stats.num_samples else 'records'}:")
      for pick in picks:
        record = growdata.read_record(directory, names[int(pick["chunk"])],
                                      int(pick["position"]))
        lines.append(_format_record(record))
  return lines


def describe(workdir: str, *, num_examples: int = 3) -> str:
  """A text report of every Grow step of ``workdir``.

  For each step: record counts, reward statistics, the reward histogram, and the
  ``num_examples`` best and worst samples with their texts.

  Raises:
    RestJaxError: missing workdir or no Grow data.
  """
  lines = [f"workdir {workdir}"]
  for step, directory in grow_dirs(workdir):
    lines.append("")
    lines += _describe_step(step, directory, num_examples)
  return "\n".join(lines)


def _record_json(record: GrowRecord, step: int) -> dict:
  return {"grow_dir_step": step, "grow_step": record.grow_step,
          "example_id": record.example_id, "sample_idx": record.sample_idx,
          "is_original": bool(record.is_original), "reward": float(record.reward),
          "inputs_pretokenized": record.inputs_pretokenized,
          "targets_pretokenized": record.targets_pretokenized,
          "inputs": [int(t) for t in record.inputs], "targets": [int(t) for t in record.targets],
          "behaviour_logprobs": [float(x) for x in record.behaviour_logprobs]}


def export_jsonl(workdir: str, path: str, *, grow_step: int | None = None) -> int:
  """Writes every Grow record (of one step, or all) to ``path``, one JSON object per line.

  Records of unfinished steps are included (their completed chunks). Keys: grow_dir_step,
  grow_step, example_id, sample_idx, is_original, reward, inputs_pretokenized,
  targets_pretokenized, inputs, targets, behaviour_logprobs.

  Returns:
    The number of records written.
  Raises:
    RestJaxError: missing workdir, no Grow data, or no Grow step ``grow_step``.
  """
  steps = grow_dirs(workdir)
  if grow_step is not None:
    chosen = [(s, d) for s, d in steps if s == grow_step]
    if not chosen:
      raise RestJaxError(f"{workdir} has no Grow step {grow_step}; it has steps "
                         f"{[s for s, _ in steps]}.")
    steps = chosen
  if not any(growdata.chunk_files(d) for _, d in steps):
    raise RestJaxError(f"no completed Grow chunks under {workdir}/grow; the Grow step has not "
                       "written any records yet. Run `rest-jax run`.")
  count = 0
  with storage.open_write(path) as f:
    for step, directory in steps:
      for record in growdata.read_records(directory):
        f.write(json.dumps(_record_json(record, step), ensure_ascii=False) + "\n")
        count += 1
  return count
