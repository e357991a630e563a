"""Threshold schedules against hand values and a numpy restatement of the ReST rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rest_jax.errors import RestJaxError
from rest_jax.improve.thresholds import FixedSchedule, ThresholdSchedule, plan_thresholds

PAPER = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class Stats:
  mean: float


def test_paper_list_with_mean_075():
  taus, messages = plan_thresholds(PAPER, mean_reward=0.75, num_improve_steps=5)
  assert taus == [0.75, 0.8, 0.9, 0.95, 0.99]
  assert len(messages) == 2
  assert "threshold 0 of Improve step 1" in messages[0] and "using 0.75" in messages[0]
  assert "threshold 0.7 " in messages[1] and "skipping" in messages[1]


def test_short_schedule_repeats_last():
  taus, messages = plan_thresholds(PAPER, mean_reward=0.75, num_improve_steps=7)
  assert taus == [0.75, 0.8, 0.9, 0.95, 0.99, 0.99, 0.99]
  assert "repeating the last threshold 0.99 for steps 6..7" in messages[-1]


def test_long_schedule_is_truncated():
  taus, messages = plan_thresholds(PAPER, mean_reward=0.75, num_improve_steps=2)
  assert taus == [0.75, 0.8]
  assert not any("repeating" in m for m in messages)
  assert plan_thresholds(PAPER, mean_reward=0.75, num_improve_steps=0)[0] == []


def test_first_threshold_above_mean_is_kept_as_given():
  taus, messages = plan_thresholds((0.5, 0.7), mean_reward=0.3, num_improve_steps=2)
  assert taus == [0.5, 0.7]
  assert messages == []


def test_mean_equal_to_a_threshold_skips_it():
  taus, _ = plan_thresholds(PAPER, mean_reward=0.7, num_improve_steps=4)
  assert taus == [0.7, 0.8, 0.9, 0.95]


def test_mean_above_every_threshold():
  taus, messages = plan_thresholds(PAPER, mean_reward=0.995, num_improve_steps=3)
  assert taus == [0.995, 0.995, 0.995]
  assert sum("skipping" in m for m in messages) == 5


def test_against_numpy_rule():
  thresholds = np.asarray(PAPER)
  for mean in np.linspace(0.0, 1.0, 41):
    taus, _ = plan_thresholds(PAPER, mean_reward=float(mean), num_improve_steps=8)
    if thresholds[0] <= mean:
      expected = np.concatenate([[mean], thresholds[thresholds > mean]])
    else:
      expected = thresholds
    expected = np.concatenate([expected, np.full(8 - len(expected), expected[-1])])[:8]
    np.testing.assert_allclose(taus, expected, rtol=0, atol=0)
    assert np.all(np.diff(taus) >= 0)
    assert taus[0] >= mean


def test_errors():
  with pytest.raises(RestJaxError, match="mean reward is nan"):
    plan_thresholds(PAPER, mean_reward=float("nan"), num_improve_steps=2)
  with pytest.raises(RestJaxError, match="empty"):
    plan_thresholds((), mean_reward=0.5, num_improve_steps=2)
  with pytest.raises(RestJaxError, match="non-decreasing"):
    plan_thresholds((0.8, 0.7), mean_reward=0.5, num_improve_steps=2)
  with pytest.raises(RestJaxError, match="num_improve_steps"):
    plan_thresholds(PAPER, mean_reward=0.5, num_improve_steps=-1)


def test_fixed_schedule():
  schedule = FixedSchedule(list(PAPER))
  assert isinstance(schedule, ThresholdSchedule)
  stats = Stats(mean=0.75)
  assert [schedule(i, stats) for i in range(1, 8)] == [0.75, 0.8, 0.9, 0.95, 0.99, 0.99, 0.99]
  assert schedule(1, Stats(mean=0.1)) == 0.1
  assert schedule(2, Stats(mean=0.1)) == 0.7
  taus, messages = schedule.plan(stats, num_improve_steps=3)
  assert taus == [0.75, 0.8, 0.9] and len(messages) == 2
  with pytest.raises(RestJaxError, match="1-based"):
    schedule(0, stats)
