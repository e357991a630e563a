"""Statistics of a Grow dataset (pure numpy; no TF reading here).

``growdata.finalize`` computes a ``GrowStats`` from the rewards of every record and stores it
as stats.json. Selecting records is ``rest_jax.improve.selection``'s job.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class GrowStats:
  """Summary of one Grow dataset D_g.

  ``mean`` is the mean reward of the policy's samples (originals excluded): the value V^pi that
  ReST's first threshold must exceed. ``std``, ``min``, ``max``, ``quantiles`` and
  ``histogram`` describe the same sample rewards. When D_g has no samples at all, they describe
  every record instead. ``mean_all`` averages every record, originals included.
  """

  count: int
  num_samples: int
  num_originals: int
  mean: float
  mean_all: float
  std: float
  min: float
  max: float
  quantiles: dict[str, float]  # "0.1" -> value, for each of QUANTILES.
  histogram: dict[str, list]  # {"edges": [bins + 1] over [0, 1], "counts": [bins]}.
  grow_step: int = -1  # The records' grow_step (-1 if they disagree).
  chunks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  # chunk file name -> {"records": n, "bytes": size, "sha256": hex}: the finalized file set.

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> GrowStats:
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_dict(cls, values: dict) -> GrowStats:
    """From ``to_json``'s dict; unknown keys are ignored, a missing field is a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    stats = cls(**{k: v for k, v in values.items() if k in names})
    if not isinstance(stats.chunks, dict) or not all(
        isinstance(v, dict) and "bytes" in v for v in stats.chunks.values()):
      raise ValueError("chunks must map file names to {records, bytes, sha256}")
    return stats


def compute_stats(rewards: np.ndarray, is_original: np.ndarray, *, grow_step: int = -1,
                  histogram_bins: int = 20,
                  chunks: dict[str, dict[str, Any]] | None = None) -> GrowStats:
  """Reward statistics of a Grow dataset.

  Args:
    rewards: float `[count]` rewards of every record, in [0, 1].
    is_original: bool `[count]`, True for the original pairs of D.
    grow_step: the records' Grow step.
    histogram_bins: equal-width bins over [0, 1].
    chunks: the chunk manifest to store alongside.
  Returns:
    The GrowStats (see its docstring for which records each field covers).
  """
  rewards = np.asarray(rewards, dtype=np.float64)
  is_original = np.asarray(is_original, dtype=bool)
  if rewards.size == 0:
    raise ValueError("compute_stats needs at least one record")
  samples = rewards[~is_original]
  dist = samples if samples.size else rewards
  counts, edges = np.histogram(dist, bins=histogram_bins, range=(0.0, 1.0))
  return GrowStats(
      count=int(rewards.size), num_samples=int(samples.size),
      num_originals=int(is_original.sum()), mean=float(dist.mean()),
      mean_all=float(rewards.mean()), std=float(dist.std()), min=float(dist.min()),
      max=float(dist.max()),
      quantiles={str(q): float(v) for q, v in zip(QUANTILES, np.quantile(dist, QUANTILES))},
      histogram={"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
      grow_step=int(grow_step), chunks=dict(chunks or {}))


def histogram_text(stats: GrowStats, *, width: int = 40) -> str:
  """The reward histogram as text, one line per bin: "[0.90, 0.95)   123 ######"."""
  edges, counts = stats.histogram["edges"], stats.histogram["counts"]
  top = max(max(counts), 1)
  lines = []
  for i, count in enumerate(counts):
    close = "]" if i == len(counts) - 1 else ")"
    bar = "#" * int(round(width * count / top))
    lines.append(f"[{edges[i]:.2f}, {edges[i + 1]:.2f}{close} {count:>9d} {bar}")
  return "\n".join(lines)


