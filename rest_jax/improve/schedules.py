"""Named threshold schedules: the reward threshold of every Improve step after a Grow step.

A schedule turns the rewards of one Grow set into one ``Threshold`` per Improve step, either a
single number (global schedules) or one number per source prompt (per-source schedules):

  fixed                     the configured list (``ImproveConfig.thresholds``; the paper's is
                            [0.0, 0.7, 0.8, 0.9, 0.95, 0.99]) under the original ReST rule.
  quantile                  tau_i = the q_i-quantile of the Grow sample rewards.
  linear                    tau_i ramps linearly from ``start`` (step 1) to ``end`` (step I).
  per_source_percentile     tau_i(x) = the p_i-th percentile of prompt x's sample rewards.
  per_source_interpolation  tau_i(x) = gamma_i max(x) + (1 - gamma_i) mean(x), gamma rising.

The ReST rule is enforced for every schedule, and every adjustment is reported as a message:
thresholds rise (non-decreasing, step to step) and the first is not below the mean reward.
Global schedules compare with the mean of all Grow samples (GrowStats.mean): a threshold below
it is raised to it. Per-source schedules compare PER SOURCE: tau_i(x) is raised to mean(x)
where it falls below (a percentile below 50 can), so each prompt trains on its own samples at
or above the policy's value on that prompt. Statistics cover the policy's samples only
(originals excluded); a prompt without samples gets tau = +inf (its original is dropped too).
A record is kept when ``reward >= tau`` (``improve.selection.select_mixture``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from rest_jax.errors import RestJaxError

SCHEDULE_NAMES = ("fixed", "quantile", "linear", "per_source_percentile",
                  "per_source_interpolation")


@dataclasses.dataclass(frozen=True)
class GrowRewards:
  """The rewards of one Grow set, from its host-side index.

  example_id: int64 `[n]`; reward: float32 `[n]`; is_original: bool `[n]`.
  """

  example_id: np.ndarray
  reward: np.ndarray
  is_original: np.ndarray

  @classmethod
  def from_index(cls, index: Mapping[str, np.ndarray]) -> GrowRewards:
    return cls(np.asarray(index["example_id"], np.int64), np.asarray(index["reward"], np.float32),
               np.asarray(index["is_original"], bool))

  @property
  def samples(self) -> np.ndarray:
    """float64 `[num_samples]`: sample rewards (every record if there are no samples)."""
    rewards = self.reward[~self.is_original]
    return (rewards if rewards.size else self.reward).astype(np.float64)

  @property
  def mean(self) -> float:
    """Mean sample reward (GrowStats.mean)."""
    return float(self.samples.mean())

  def quantiles(self, qs: Sequence[float]) -> list[float]:
    """numpy's (linear) quantiles ``qs`` of ``samples``."""
    return [float(t) for t in np.quantile(self.samples, list(qs))] if len(qs) else []

  def map_sources(self, fn: Callable[[np.ndarray], Sequence[float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct example ids `[sources]` and ``fn`` of each one's sample rewards (float64
    `[n]`, possibly empty), stacked as float64 `[sources, len(fn(...))]`."""
    ids, rewards = self.per_source()
    return ids, np.asarray([list(fn(r)) for r in rewards], np.float64).reshape(len(ids), -1)

  def per_source(self) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted distinct example ids `[sources]` and each one's sample rewards (float64)."""
    ids = np.unique(self.example_id)
    samples = ~self.is_original
    order = np.argsort(self.example_id[samples], kind="stable")
    sid, srew = self.example_id[samples][order], self.reward[samples][order].astype(np.float64)
    bounds = np.searchsorted(sid, ids, side="left"), np.searchsorted(sid, ids, side="right")
    return ids, [srew[a:b] for a, b in zip(*bounds)]


@dataclasses.dataclass(frozen=True)
class Threshold:
  """The threshold of one Improve step: one number, or one per source prompt.

  value: the global threshold; for a per-source one, the mean of its finite per-source values
    (what summaries and plots show).
  example_ids: int64 `[sources]` sorted, or None for a global threshold.
  per_source: float64 `[sources]` thresholds of those sources, or None.
  """

  value: float
  example_ids: np.ndarray | None = None
  per_source: np.ndarray | None = None

  @property
  def is_per_source(self) -> bool:
    return self.per_source is not None

  def for_records(self, example_ids: np.ndarray) -> np.ndarray:
    """float64 `[n]`: the threshold of each record; +inf for a source this plan does not know."""
    example_ids = np.asarray(example_ids, np.int64)
    if self.per_source is None:
      return np.full(example_ids.shape, self.value, np.float64)
    pos = np.clip(np.searchsorted(self.example_ids, example_ids), 0, len(self.example_ids) - 1)
    known = self.example_ids[pos] == example_ids
    return np.where(known, self.per_source[pos], np.inf)

  def describe(self) -> str:
    if self.per_source is None:
      return f"{self.value:.3f}"
    finite = self.per_source[np.isfinite(self.per_source)]
    return (f"per-source mean {self.value:.3f} (min {finite.min():.3f}, max {finite.max():.3f})"
            if finite.size else "per-source (no finite value)")


@runtime_checkable
class Schedule(Protocol):
  """Plans the thresholds of Improve steps 1..num_improve_steps from one Grow set's rewards."""

  def plan(self, grow: GrowRewards, *,
           num_improve_steps: int) -> tuple[list[Threshold], list[str]]:
    ...


def _check_increasing(name: str, values: Sequence[float], lo: float, hi: float) -> tuple:
  values = tuple(float(v) for v in values)
  if not values or any(not (lo <= v <= hi) for v in values) or any(
      b <= a for a, b in zip(values, values[1:])):
    raise RestJaxError(f"schedule parameter {name}={list(values)} must be a non-empty, strictly "
                       f"increasing list in [{lo:g}, {hi:g}].")
  return values


def _pad(values: list, num_improve_steps: int, messages: list[str], what: str) -> list:
  if len(values) < num_improve_steps:
    messages.append(f"the schedule has {len(values)} {what} for {num_improve_steps} Improve "
                    f"steps; repeating the last for steps {len(values) + 1}..{num_improve_steps}.")
    values = values + [values[-1]] * (num_improve_steps - len(values))
  return values[:num_improve_steps]


def _global_rule(taus: list[float], mean: float, messages: list[str]) -> list[Threshold]:
  """Raises thresholds below the Grow mean to it; checks they rise."""
  out = []
  for i, tau in enumerate(taus, start=1):
    if tau < mean:
      messages.append(f"threshold {tau:g} of Improve step {i} is below the Grow mean reward "
                      f"{mean:g}; using {mean:g} instead.")
      tau = mean
    if out and tau < out[-1].value:
      raise RestJaxError(f"thresholds {taus} do not rise; configure increasing parameters.")
    out.append(Threshold(float(tau)))
  return out


@dataclasses.dataclass(frozen=True)
class Fixed:
  """A configured, non-decreasing threshold list under the original ReST rule.

  When ``thresholds[0] <= mean`` (the Grow set's mean sample reward) the plan is ``[mean]``
  followed by the entries above the mean (the first step trains on the part of the Grow set
  above the policy's value); otherwise the thresholds are used as given. A list shorter than
  the number of Improve steps repeats its last threshold; a longer one is truncated.
  """

  thresholds: tuple[float, ...]

  def __post_init__(self):
    thresholds = tuple(float(t) for t in self.thresholds)
    if not thresholds:
      raise RestJaxError("the threshold schedule is empty; give at least one threshold "
                         "(e.g. ImproveConfig.thresholds = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)).")
    if any(not math.isfinite(t) for t in thresholds) or any(
        b < a for a, b in zip(thresholds, thresholds[1:])):
      raise RestJaxError(f"thresholds {list(thresholds)} must be finite and non-decreasing; "
                         "sort them in increasing order.")
    object.__setattr__(self, "thresholds", thresholds)

  def plan(self, grow: GrowRewards, *, num_improve_steps: int):
    if num_improve_steps < 0:
      raise RestJaxError(f"num_improve_steps must be >= 0, got {num_improve_steps}.")
    mean = float(grow.mean)
    if not math.isfinite(mean):
      raise RestJaxError(f"the Grow set's mean reward is {mean}, so no threshold can be "
                         "placed above it; check that the reward function returns finite "
                         "numbers and that the Grow set is not empty.")
    messages: list[str] = []
    taus = list(self.thresholds)
    if taus[0] <= mean:
      messages.append(
          f"threshold {taus[0]:g} of Improve step 1 is not above the Grow mean reward "
          f"{mean:g}; using {mean:g} (keep only samples above the mean) instead.")
      for t in taus[1:]:
        if t <= mean:
          messages.append(f"threshold {t:g} is not above the Grow mean reward {mean:g}; "
                          "skipping it.")
      taus = [mean] + [t for t in taus[1:] if t > mean]
    if len(taus) < num_improve_steps:
      messages.append(
          f"the schedule {taus} has {len(taus)} thresholds for {num_improve_steps} Improve "
          f"steps; repeating the last threshold {taus[-1]:g} for steps {len(taus) + 1}.."
          f"{num_improve_steps}.")
      taus += [taus[-1]] * (num_improve_steps - len(taus))
    return [Threshold(t) for t in taus[:num_improve_steps]], messages


@dataclasses.dataclass(frozen=True)
class Quantile:
  """tau_i = the ``quantiles[i-1]``-quantile of the Grow sample rewards (numpy's linear rule)."""

  quantiles: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "quantiles", _check_increasing("quantiles", self.quantiles, 0, 1))

  def plan(self, grow: GrowRewards, *, num_improve_steps: int):
    messages: list[str] = []
    qs = _pad(list(self.quantiles), num_improve_steps, messages, "quantiles")
    taus = grow.quantiles(qs)
    return _global_rule(taus, grow.mean, messages), messages


@dataclasses.dataclass(frozen=True)
class Linear:
  """tau_i = start + (end - start) (i - 1) / (I - 1) for I Improve steps (start when I = 1)."""

  start: float
  end: float

  def __post_init__(self):
    if not (0.0 <= self.start < self.end <= 1.0):
      raise RestJaxError(f"linear schedule start={self.start}, end={self.end}: need "
                         "0 <= start < end <= 1 (a rising ramp).")

  def plan(self, grow: GrowRewards, *, num_improve_steps: int):
    messages: list[str] = []
    taus = [float(t) for t in np.linspace(self.start, self.end, num_improve_steps)]
    return _global_rule(taus, grow.mean, messages), messages


def _per_source_rule(name: str, ids: np.ndarray, means: np.ndarray,
                     taus: list[np.ndarray], messages: list[str]) -> list[Threshold]:
  """Raises tau_i(x) below mean(x) to mean(x); checks per-source taus rise; summarises."""
  out, previous = [], None
  for i, tau in enumerate(taus, start=1):
    low = tau < means
    if low.any():
      messages.append(f"{name}: Improve step {i}: {int(low.sum())} of {len(ids)} sources have a "
                      "threshold below their mean sample reward; using their mean instead.")
      tau = np.where(low, means, tau)
    if previous is not None and (tau < previous).any():
      raise RestJaxError(f"{name}: per-source thresholds of Improve step {i} fall below step "
                         f"{i - 1}'s; configure increasing parameters.")
    finite = tau[np.isfinite(tau)]
    out.append(Threshold(float(finite.mean()) if finite.size else math.inf, ids, tau))
    previous = tau
  return out


def _source_stats(grow: GrowRewards, name: str, messages: list[str],
                  extra: Callable[[np.ndarray], list[float]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids `[sources]`, means `[sources]`, ``extra`` of each source `[sources, k]`); a source
  without samples gets mean +inf and extras +inf."""
  width = len(extra(np.ones(1)))

  def one(rewards: np.ndarray) -> list[float]:
    if not rewards.size:
      return [0.0, np.inf] + [np.inf] * width
    return [1.0, float(rewards.mean())] + list(extra(rewards))

  ids, values = grow.map_sources(one)
  empty = values[:, 0] == 0
  if empty.any():
    messages.append(f"{name}: {int(empty.sum())} sources have no samples; they get threshold "
                    "+inf (nothing of theirs is kept).")
  return ids, values[:, 1], values[:, 2:]


@dataclasses.dataclass(frozen=True)
class PerSourcePercentile:
  """tau_i(x) = the ``percentiles[i-1]``-th percentile (0..100) of prompt x's sample rewards."""

  percentiles: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "percentiles",
                       _check_increasing("percentiles", self.percentiles, 0, 100))

  def plan(self, grow: GrowRewards, *, num_improve_steps: int):
    messages: list[str] = []
    ps = _pad(list(self.percentiles), num_improve_steps, messages, "percentiles")
    ids, means, pcts = _source_stats(grow, "per_source_percentile", messages,
                                     lambda r: [float(np.percentile(r, p)) for p in ps])
    taus = [pcts[:, i] for i in range(len(ps))]
    return _per_source_rule("per_source_percentile", ids, means, taus, messages), messages


@dataclasses.dataclass(frozen=True)
class PerSourceInterpolation:
  """tau_i(x) = gamma_i max(x) + (1 - gamma_i) mean(x) over prompt x's sample rewards."""

  gammas: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "gammas", _check_increasing("gammas", self.gammas, 0, 1))

  def plan(self, grow: GrowRewards, *, num_improve_steps: int):
    messages: list[str] = []
    gs = _pad(list(self.gammas), num_improve_steps, messages, "gammas")
    ids, means, maxes = _source_stats(grow, "per_source_interpolation", messages,
                                      lambda r: [float(r.max())])
    maxes = maxes[:, 0]
    # As mean + g (max - mean), clipped to max: exactly mean(x) when every sample of x has the
    # same reward, and rising with g. (g max + (1 - g) mean can land one ulp above max = mean
    # for g = 0.1 and back on it for g = 0.5: a spurious "thresholds fall" error.)
    with np.errstate(invalid="ignore"):
      taus = [np.where(np.isfinite(means), np.minimum(means + g * (maxes - means), maxes),
                       np.inf) for g in gs]
    return _per_source_rule("per_source_interpolation", ids, means, taus, messages), messages


def make_schedule(name: str, *, thresholds: Sequence[float] = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99),
                  quantiles: Sequence[float] = (0.5, 0.75, 0.9),
                  percentiles: Sequence[float] = (50.0, 75.0, 90.0),
                  gammas: Sequence[float] = (0.0, 0.5, 0.9),
                  start: float = 0.8, end: float = 0.99) -> Schedule:
  """The schedule called ``name`` with its parameters (the others are ignored).

  Raises:
    RestJaxError: an unknown name (the message lists the known ones) or bad parameters.
  """
  if name == "fixed":
    return Fixed(tuple(float(t) for t in thresholds))
  if name == "quantile":
    return Quantile(tuple(quantiles))
  if name == "linear":
    return Linear(float(start), float(end))
  if name == "per_source_percentile":
    return PerSourcePercentile(tuple(percentiles))
  if name == "per_source_interpolation":
    return PerSourceInterpolation(tuple(gammas))
  raise RestJaxError(f"threshold schedule {name!r} is unknown; known schedules: "
                     f"{', '.join(SCHEDULE_NAMES)} (set ImproveConfig.schedule).")


def from_config(improve: object) -> Schedule:
  """The schedule of an ``ImproveConfig`` (its ``schedule`` name and ``schedule_params``)."""
  params = getattr(improve, "schedule_params", None)
  kwargs = {} if params is None else {
      f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
  return make_schedule(getattr(improve, "schedule", "fixed"),
                       thresholds=improve.thresholds, **kwargs)
