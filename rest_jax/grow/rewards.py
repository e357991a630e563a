"""A finalized Grow set's rewards as the threshold schedules read them, streamed one chunk index
at a time (``improve.schedules.GrowRewards`` holds them all in memory instead).

Memory: one chunk index, plus, for per-source schedules, a few floats per prompt. Results equal
``GrowRewards``': quantiles are exact (``stats.Accumulator``), per-source values are computed
from each prompt's rewards exactly as in memory, and the mean is stats.json's (float64, summed
chunk by chunk: equal to numpy's up to summation order, about 1e-16 relative).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import versions
from rest_jax.grow.stats import Accumulator
from rest_jax.improve.schedules import GrowRewards


class StreamedGrowRewards:
  """``GrowRewards``' interface for the schedules (``mean``, ``quantiles``, ``map_sources``)."""

  def __init__(self, directory: str, reward_version: int = 0):
    """``reward_version``: the reward column to read (0: Grow's; ``grow.versions``)."""
    self.directory, self.version = directory, reward_version
    self._stats = versions.version_stats(directory, reward_version)
    self._names = sorted(self._stats.chunks)

  def _chunks(self):
    for name in self._names:
      yield versions.rows_with_version(self.directory, name,
                                       chunkindex.read_rows(self.directory, name), self.version)

  @property
  def mean(self) -> float:
    return float(self._stats.mean)

  def quantiles(self, qs: Sequence[float]) -> list[float]:
    if not len(qs):
      return []
    acc = Accumulator(quantiles=tuple(qs))
    for rows in self._chunks():
      acc.add(rows["reward"], rows["is_original"].astype(bool))
    for rows in self._chunks():
      acc.refine(rows["reward"], rows["is_original"].astype(bool))
    return acc.quantile_values()

  def map_sources(self, fn: Callable[[np.ndarray], Sequence[float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """As ``GrowRewards.map_sources``, one chunk at a time (every prompt's records lie in one
    chunk when the Grow step wrote them; otherwise the whole index is read, as before)."""
    all_ids, all_values = [], []
    for rows in self._chunks():
      part = GrowRewards(rows["example_id"], rows["reward"].astype(np.float32),
                         rows["is_original"].astype(bool))
      ids, values = part.map_sources(fn)
      all_ids.append(ids)
      all_values.append(values)
    ids = np.concatenate(all_ids)
    if np.unique(ids).size != ids.size:  # A prompt spread over chunks: read it all.
      index = dict(growdata.load_index(self.directory))
      index["reward"] = versions.index_rewards(self.directory, index, self.version)
      return GrowRewards.from_index(index).map_sources(fn)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.concatenate(all_values)[order]
