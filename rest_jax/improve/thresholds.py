"""Threshold schedules: the reward threshold tau_i of each Improve step.

ReST trains Improve step i on the Grow pairs whose reward is above tau_i. The paper's rule: tau_1
is above the mean reward of the Grow set (training on the part of D_g above the policy's value
raises it) and tau_{i+1} > tau_i. ``plan_thresholds`` turns a configured list (the paper's
``[0.0, 0.7, 0.8, 0.9, 0.95, 0.99]`` by default) into the effective per-step thresholds under
that rule, with a message for every change; schedules are pure functions of
``(improve_step, grow stats)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence, runtime_checkable

from rest_jax.errors import RestJaxError


class GrowStatsLike(Protocol):
  """What a schedule reads from the Grow statistics (``growdata`` stats have more)."""

  @property
  def mean(self) -> float:
    """Mean reward of the Grow samples."""


@runtime_checkable
class ThresholdSchedule(Protocol):
  """Maps an Improve step (1-based) and the Grow statistics to a reward threshold."""

  def __call__(self, improve_step: int, stats: GrowStatsLike) -> float:
    ...


def plan_thresholds(thresholds: Sequence[float], *, mean_reward: float,
                    num_improve_steps: int) -> tuple[list[float], list[str]]:
  """The effective thresholds of Improve steps 1..num_improve_steps under the ReST rule.

  When ``thresholds[0] <= mean_reward`` the schedule becomes ``[mean_reward]`` followed by the
  entries above the mean (pairs are kept when ``reward > tau``, so the first step trains on the
  part of the Grow set above its mean); otherwise the thresholds are used as given. A schedule
  shorter than ``num_improve_steps`` repeats its last threshold.

  Args:
    thresholds: the configured, non-decreasing thresholds.
    mean_reward: mean reward of the Grow set.
    num_improve_steps: how many Improve steps follow this Grow step (>= 0).
  Returns:
    ``(taus, messages)``: ``num_improve_steps`` non-decreasing thresholds, and one log message
    per change made to the configured list.
  """
  thresholds = [float(t) for t in thresholds]
  if not thresholds:
    raise RestJaxError("the threshold schedule is empty; give at least one threshold "
                       "(e.g. ImproveConfig.thresholds = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)).")
  if any(not math.isfinite(t) for t in thresholds) or any(
      b < a for a, b in zip(thresholds, thresholds[1:])):
    raise RestJaxError(f"thresholds {thresholds} must be finite and non-decreasing; "
                       "sort them in increasing order.")
  if num_improve_steps < 0:
    raise RestJaxError(f"num_improve_steps must be >= 0, got {num_improve_steps}.")
  mean_reward = float(mean_reward)
  if not math.isfinite(mean_reward):
    raise RestJaxError(f"the Grow set's mean reward is {mean_reward}, so no threshold can be "
                       "placed above it; check that the reward function returns finite "
                       "numbers and that the Grow set is not empty.")
  messages: list[str] = []
  if thresholds[0] <= mean_reward:
    taus = [mean_reward]
    messages.append(
        f"threshold {thresholds[0]:g} of Improve step 1 is not above the Grow mean reward "
        f"{mean_reward:g}; using {mean_reward:g} (keep only samples above the mean) instead.")
    for t in thresholds[1:]:
      if t > mean_reward:
        taus.append(t)
      else:
        messages.append(f"threshold {t:g} is not above the Grow mean reward {mean_reward:g}; "
                        "skipping it.")
  else:
    taus = list(thresholds)
  if len(taus) < num_improve_steps:
    messages.append(
        f"the schedule {taus} has {len(taus)} thresholds for {num_improve_steps} Improve steps; "
        f"repeating the last threshold {taus[-1]:g} for steps {len(taus) + 1}.."
        f"{num_improve_steps}.")
    taus += [taus[-1]] * (num_improve_steps - len(taus))
  return taus[:num_improve_steps], messages


@dataclasses.dataclass(frozen=True)
class FixedSchedule:
  """A configured threshold list, made effective by ``plan_thresholds`` for each Grow set."""

  thresholds: Sequence[float]

  def __post_init__(self):
    object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

  def plan(self, stats: GrowStatsLike, *,
           num_improve_steps: int) -> tuple[list[float], list[str]]:
    """``plan_thresholds`` for this Grow set: the thresholds of steps 1..num_improve_steps."""
    return plan_thresholds(self.thresholds, mean_reward=stats.mean,
                           num_improve_steps=num_improve_steps)

  def __call__(self, improve_step: int, stats: GrowStatsLike) -> float:
    """The threshold of Improve step ``improve_step`` (1-based)."""
    if improve_step < 1:
      raise RestJaxError(f"improve_step is 1-based, got {improve_step}.")
    taus, _ = self.plan(stats, num_improve_steps=improve_step)
    return taus[improve_step - 1]
