"""Statistics of a Grow dataset (pure numpy; no TF reading here).

``growdata.finalize`` computes a ``GrowStats`` from the rewards of every record and stores it
as stats.json. Selecting records is ``rest_jax.improve.selection``'s job.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

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
  # Adaptive sampling's budget (``budget_summary``); {} for a fixed-N Grow.
  adaptive: dict[str, Any] = dataclasses.field(default_factory=dict)

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


def budget_summary(rows: Iterable[np.ndarray], *, threshold: float, min_passing: int,
                   max_samples: int, samples_per_round: int) -> dict[str, Any]:
  """What adaptive sampling (``rest_jax.grow.adaptive``) drew, from the chunk index rows
  (``chunkindex.ROW``, one array per chunk; a prompt's samples lie in one chunk).

  Returns:
    dict: the settings; "prompts" (with samples), "samples_drawn", "fixed_samples" (prompts x
    N_max: a fixed-N_max Grow's draw), "saved_fraction", "solved_prompts" (>= k passing), and
    "prompts_per_round" `[rounds]` (how many prompts stopped after each round).
  """
  rounds = max_samples // samples_per_round
  per_round = np.zeros(rounds, np.int64)
  prompts = drawn = solved = 0
  tau = np.float32(threshold)
  for part in rows:
    s = part[part["is_original"] == 0]
    ids, inverse, counts = np.unique(s["example_id"], return_inverse=True, return_counts=True)
    passed = np.bincount(inverse, weights=(s["reward"].astype(np.float32) >= tau),
                         minlength=ids.size)
    prompts += int(ids.size)
    drawn += int(counts.sum())
    solved += int((passed >= min_passing).sum())
    used = np.clip(-(-counts // samples_per_round), 1, rounds) - 1
    per_round += np.bincount(used, minlength=rounds)
  fixed = prompts * max_samples
  return {"threshold": float(threshold), "min_passing": int(min_passing),
          "max_samples": int(max_samples), "samples_per_round": int(samples_per_round),
          "prompts": prompts, "samples_drawn": drawn, "fixed_samples": fixed,
          "saved_fraction": 1.0 - drawn / fixed if fixed else 0.0, "solved_prompts": solved,
          "prompts_per_round": per_round.tolist()}


def _lerp(a: float, b: float, t: float) -> float:
  """numpy.quantile's linear interpolation, term for term (so the result is bit-identical)."""
  diff = b - a
  return b - diff * (1 - t) if t >= 0.5 else a + diff * t


class Accumulator:
  """Exact ``compute_stats`` over records fed one chunk at a time, in bounded memory.

  Two passes over the same chunks: ``add`` (pass 1: counts, sums, min, max, histogram, and a
  histogram of the top 16 bits of each float32 reward), then ``refine`` (pass 2: the squared
  deviations for ``std``, and histograms of the low 16 bits inside the few top-bit buckets that
  hold the order statistics the quantiles need), then ``result``. Rewards are float32 in [0, 1],
  whose bit patterns sort like their values, so the order statistics, and with numpy's linear
  rule the quantiles, are exact; mean and std match numpy up to summation order (float64).
  Memory: 2 x 65536 counts plus 65536 per refined bucket (at most 2 per quantile).
  """

  def __init__(self, histogram_bins: int = 20, quantiles: tuple[float, ...] = QUANTILES):
    self.bins, self.qs = histogram_bins, tuple(float(q) for q in quantiles)
    self.count = self.num_originals = 0
    self.sum_all = 0.0
    self._dist = {True: _Moments(), False: _Moments()}  # samples (True) / all records.
    self._counts = {True: np.zeros(histogram_bins, np.int64),
                    False: np.zeros(histogram_bins, np.int64)}
    self._top = {True: np.zeros(1 << 16, np.int64), False: np.zeros(1 << 16, np.int64)}
    self._low: dict[int, np.ndarray] = {}
    self._sq = 0.0

  @property
  def _samples(self) -> bool:
    """Whether the distribution is the samples' (False: every record; no samples at all)."""
    return self._dist[True].n > 0

  def add(self, rewards: np.ndarray, is_original: np.ndarray) -> None:
    """Pass 1 over one chunk: float `[n]` rewards and bool `[n]` is_original."""
    rewards = np.asarray(rewards, np.float32) + np.float32(0)  # -0.0 -> 0.0 (bit order).
    is_original = np.asarray(is_original, bool)
    self.count += rewards.size
    self.num_originals += int(is_original.sum())
    self.sum_all += float(rewards.astype(np.float64).sum())
    for which, values in ((True, rewards[~is_original]), (False, rewards)):
      self._dist[which].add(values)
      self._counts[which] += np.histogram(values, bins=self.bins, range=(0.0, 1.0))[0]
      self._top[which] += np.bincount(values.view(np.uint32) >> 16, minlength=1 << 16)

  def _ranks(self) -> list[tuple[int, int, float]]:
    n = self._dist[self._samples].n
    out = []
    for q in self.qs:
      virtual = (n - 1) * q
      lo = int(np.floor(virtual))
      out.append((lo, min(lo + 1, n - 1), float(virtual - lo)))
    return out

  def _top_bucket(self, rank: int) -> int:
    return int(np.searchsorted(np.cumsum(self._top[self._samples]), rank, side="right"))

  def refine(self, rewards: np.ndarray, is_original: np.ndarray) -> None:
    """Pass 2 over the same chunk (after every ``add``)."""
    rewards = np.asarray(rewards, np.float32) + np.float32(0)
    values = rewards[~np.asarray(is_original, bool)] if self._samples else rewards
    mean = self._dist[self._samples].mean
    self._sq += float(((values.astype(np.float64) - mean) ** 2).sum())
    if not self._low:
      self._low = {self._top_bucket(r): np.zeros(1 << 16, np.int64)
                   for lo, hi, _ in self._ranks() for r in (lo, hi)}
    bits = values.view(np.uint32)
    for bucket, counts in self._low.items():
      inside = bits[(bits >> 16) == bucket]
      counts += np.bincount(inside & 0xFFFF, minlength=1 << 16)

  def _order_statistic(self, rank: int) -> float:
    bucket = self._top_bucket(rank)
    before = int(np.cumsum(self._top[self._samples])[bucket - 1]) if bucket else 0
    low = int(np.searchsorted(np.cumsum(self._low[bucket]), rank - before, side="right"))
    return float(np.uint32((bucket << 16) | low).view(np.float32))

  def quantile_values(self) -> list[float]:
    """The quantiles (constructor's ``quantiles``), numpy's linear rule, after both passes."""
    return [_lerp(self._order_statistic(lo), self._order_statistic(hi), t)
            for lo, hi, t in self._ranks()]

  def result(self, *, grow_step: int = -1,
             chunks: dict[str, dict[str, Any]] | None = None) -> GrowStats:
    """The GrowStats (``compute_stats``'s fields) after both passes."""
    if self.count == 0:
      raise ValueError("compute_stats needs at least one record")
    dist = self._dist[self._samples]
    quantiles = dict(zip(map(str, self.qs), self.quantile_values()))
    edges = np.histogram(np.zeros(0), bins=self.bins, range=(0.0, 1.0))[1]
    return GrowStats(
        count=self.count, num_samples=self._dist[True].n, num_originals=self.num_originals,
        mean=dist.mean, mean_all=self.sum_all / self.count, std=float(np.sqrt(self._sq / dist.n)),
        min=dist.min, max=dist.max, quantiles=quantiles,
        histogram={"edges": [float(e) for e in edges],
                   "counts": [int(c) for c in self._counts[self._samples]]},
        grow_step=int(grow_step), chunks=dict(chunks or {}))


class _Moments:
  """Count, sum, min and max of a stream of values."""

  def __init__(self):
    self.n, self.total, self.min, self.max = 0, 0.0, float("inf"), float("-inf")

  def add(self, values: np.ndarray) -> None:
    if values.size:
      self.n += int(values.size)
      self.total += float(values.astype(np.float64).sum())
      self.min = min(self.min, float(values.min()))
      self.max = max(self.max, float(values.max()))

  @property
  def mean(self) -> float:
    return self.total / self.n if self.n else float("nan")
