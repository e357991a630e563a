"""Named threshold schedules against numpy restatements of their definitions and the ReST rule."""

from __future__ import annotations

import numpy as np
import pytest

from rest_jax import config as C
from rest_jax.improve import schedules
from rest_jax.errors import RestJaxError
from rest_jax.improve.schedules import GrowRewards, Threshold, make_schedule


def _grow(seed: int = 0, sources: int = 12, n: int = 6) -> GrowRewards:
  """Sources 0..sources-1 (shuffled order), n samples each (some skewed), plus one original."""
  rng = np.random.default_rng(seed)
  ids, rewards, original = [], [], []
  for e in range(sources):
    skew = rng.uniform(0.5, 4.0)
    ids += [e] * (n + 1)
    rewards += list(np.round(rng.beta(skew, 1.5, size=n) * 64) / 64) + [1.0]
    original += [False] * n + [True]
  perm = rng.permutation(len(ids))
  return GrowRewards(np.asarray(ids, np.int64)[perm], np.asarray(rewards, np.float32)[perm],
                     np.asarray(original)[perm])


def _check_rule_global(taus, mean):
  values = [t.value for t in taus]
  assert all(not t.is_per_source for t in taus)
  assert values[0] >= mean and all(b >= a for a, b in zip(values, values[1:]))


PAPER = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)


def _mean(mean: float) -> GrowRewards:
  """A Grow set whose mean sample reward is ``mean`` (one sample and one original)."""
  return GrowRewards(np.asarray([0, 0]), np.asarray([mean, 1.0], np.float32),
                     np.asarray([False, True]))


def _fixed(thresholds, mean: float, steps: int):
  taus, messages = schedules.Fixed(thresholds).plan(_mean(mean), num_improve_steps=steps)
  assert all(not t.is_per_source for t in taus)
  return [t.value for t in taus], messages


def test_fixed_by_hand():
  grow = _grow()
  mean = float(grow.reward[~grow.is_original].astype(np.float64).mean())
  assert 0.6 < mean < 0.7  # So 0.0 becomes the mean and 0.7, 0.8, 0.9 stay.
  taus, messages = make_schedule("fixed", thresholds=(0.0, 0.7, 0.8, 0.9)).plan(
      grow, num_improve_steps=5)
  assert [t.value for t in taus] == pytest.approx([mean, 0.7, 0.8, 0.9, 0.9], abs=1e-12)
  assert len(messages) == 2 and f"using {mean:g}" in messages[0]
  assert "repeating the last threshold 0.9 for steps 5..5" in messages[1]


def test_fixed_paper_list_with_mean_075():
  taus, messages = _fixed(PAPER, 0.75, 5)
  assert taus == [0.75, 0.8, 0.9, 0.95, 0.99]
  assert len(messages) == 2
  assert "threshold 0 of Improve step 1" in messages[0] and "using 0.75" in messages[0]
  assert "threshold 0.7 " in messages[1] and "skipping" in messages[1]


def test_fixed_short_list_repeats_last_and_long_list_is_truncated():
  taus, messages = _fixed(PAPER, 0.75, 7)
  assert taus == [0.75, 0.8, 0.9, 0.95, 0.99, 0.99, 0.99]
  assert "repeating the last threshold 0.99 for steps 6..7" in messages[-1]
  taus, messages = _fixed(PAPER, 0.75, 2)
  assert taus == [0.75, 0.8] and not any("repeating" in m for m in messages)
  assert _fixed(PAPER, 0.75, 0)[0] == []


def test_fixed_first_threshold_above_mean_is_kept_and_equal_is_skipped():
  assert _fixed((0.5, 0.7), 0.25, 2) == ([0.5, 0.7], [])
  assert _fixed(PAPER, 0.5, 4)[0] == [0.5, 0.7, 0.8, 0.9]  # 0.5 is exact in float32.
  taus, messages = _fixed(PAPER, 0.75, 3)
  assert taus == [0.75, 0.8, 0.9]
  taus, messages = _fixed(PAPER, 0.875, 3)  # Above every threshold up to 0.9.
  assert taus == [0.875, 0.9, 0.95] and sum("skipping" in m for m in messages) == 2


def test_fixed_against_numpy_rule():
  thresholds = np.asarray(PAPER)
  for mean in np.linspace(0.0, 1.0, 41):
    grow = _mean(float(mean))
    m = float(np.float32(mean))  # Rewards are float32.
    taus, _ = _fixed(PAPER, float(mean), 8)
    expected = np.concatenate([[m], thresholds[thresholds > m]]) if thresholds[0] <= m \
        else thresholds
    expected = np.concatenate([expected, np.full(8 - len(expected), expected[-1])])[:8]
    np.testing.assert_allclose(taus, expected, rtol=0, atol=0)
    assert np.all(np.diff(taus) >= 0) and taus[0] >= grow.mean


def test_fixed_errors():
  with pytest.raises(RestJaxError, match="mean reward is nan"):
    schedules.Fixed(PAPER).plan(GrowRewards(np.zeros(1, np.int64), np.full(1, np.nan, np.float32),
                                            np.zeros(1, bool)), num_improve_steps=2)
  with pytest.raises(RestJaxError, match="empty"):
    schedules.Fixed(())
  with pytest.raises(RestJaxError, match="non-decreasing"):
    make_schedule("fixed", thresholds=(0.8, 0.7))
  with pytest.raises(RestJaxError, match="num_improve_steps"):
    schedules.Fixed(PAPER).plan(_mean(0.5), num_improve_steps=-1)


def test_mean_covers_samples_only():
  grow = _grow()
  assert grow.mean == pytest.approx(float(grow.reward[~grow.is_original].astype(float).mean()))


@pytest.mark.parametrize("quantiles", [(0.5, 0.75, 0.9), (0.1, 0.6), (0.3,)])
def test_quantile_against_numpy(quantiles):
  grow = _grow(1)
  samples = grow.reward[~grow.is_original].astype(np.float64)
  taus, messages = make_schedule("quantile", quantiles=quantiles).plan(grow, num_improve_steps=4)
  qs = list(quantiles) + [quantiles[-1]] * (4 - len(quantiles))
  expected = np.maximum(np.quantile(samples, qs), samples.mean())
  np.testing.assert_allclose([t.value for t in taus], expected, rtol=0, atol=1e-12)
  _check_rule_global(taus, samples.mean())
  if quantiles[0] == 0.1:  # The 10% quantile is below the mean: raised, with a message.
    assert any("below the Grow mean reward" in m for m in messages)


def test_linear_ramp_against_numpy():
  grow = _grow(2)
  taus, messages = make_schedule("linear", start=0.2, end=0.95).plan(grow, num_improve_steps=4)
  expected = np.maximum(np.linspace(0.2, 0.95, 4), grow.mean)
  np.testing.assert_allclose([t.value for t in taus], expected, rtol=0, atol=1e-12)
  assert taus[0].value == pytest.approx(grow.mean) and "below the Grow mean" in messages[0]
  _check_rule_global(taus, grow.mean)
  one, _ = make_schedule("linear", start=0.9, end=0.95).plan(grow, num_improve_steps=1)
  assert [t.value for t in one] == [max(0.9, grow.mean)]


def _numpy_per_source(grow, fn):
  out = {}
  for e in np.unique(grow.example_id):
    r = grow.reward[(grow.example_id == e) & ~grow.is_original].astype(np.float64)
    out[int(e)] = max(fn(r), r.mean())
  return out


@pytest.mark.parametrize("percentiles", [(25.0, 50.0, 90.0), (60.0, 99.0)])
def test_per_source_percentile_against_numpy(percentiles):
  grow = _grow(3)
  taus, messages = make_schedule("per_source_percentile", percentiles=percentiles).plan(
      grow, num_improve_steps=3)
  ps = list(percentiles) + [percentiles[-1]] * (3 - len(percentiles))
  previous = None
  for tau, p in zip(taus, ps):
    expected = _numpy_per_source(grow, lambda r, p=p: np.percentile(r, p))
    assert tau.is_per_source and tau.example_ids.tolist() == sorted(expected)
    np.testing.assert_allclose(tau.per_source, [expected[e] for e in sorted(expected)],
                               rtol=0, atol=1e-12)
    assert tau.value == pytest.approx(np.mean(list(expected.values())))
    if previous is not None:  # Rises per source.
      assert (tau.per_source >= previous).all()
    previous = tau.per_source
  if percentiles[0] == 25.0:
    assert any("below their mean sample reward" in m for m in messages)


def test_per_source_interpolation_against_numpy():
  grow = _grow(4)
  gammas = (0.0, 0.3, 0.8)
  taus, _ = make_schedule("per_source_interpolation", gammas=gammas).plan(grow,
                                                                          num_improve_steps=3)
  for tau, g in zip(taus, gammas):
    expected = _numpy_per_source(grow, lambda r, g=g: g * r.max() + (1 - g) * r.mean())
    np.testing.assert_allclose(tau.per_source, [expected[e] for e in sorted(expected)],
                               rtol=0, atol=1e-12)
  means = np.asarray(list(_numpy_per_source(grow, np.mean).values()))
  np.testing.assert_allclose(taus[0].per_source, means, rtol=0, atol=1e-12)  # gamma 0: mean(x).


def test_per_source_interpolation_with_tied_samples_keeps_them():
  # Every sample of source 0 has the same reward m: tau(x) must be exactly m for every gamma.
  # g max + (1 - g) mean is m + 1.1e-16 at g = 0.1 and m at g = 0.5 (it fell: RestJaxError).
  m = float(np.float32(0.8123))
  grow = GrowRewards(np.asarray([0, 0, 0, 1, 1]), np.asarray([m, m, m, 0.25, 0.75], np.float32),
                     np.zeros(5, bool))
  taus, _ = make_schedule("per_source_interpolation", gammas=(0.1, 0.5, 0.9)).plan(
      grow, num_improve_steps=3)
  for tau, expected in zip(taus, (0.525, 0.625, 0.725)):  # Source 1: 0.5 + g * (0.75 - 0.5).
    assert tau.per_source[0] == m and tau.per_source[1] == pytest.approx(expected, abs=1e-15)
    np.testing.assert_array_equal(grow.reward.astype(np.float64) >= tau.for_records(
        grow.example_id), [True, True, True, False, True])


def test_threshold_for_records():
  tau = Threshold(0.5, np.asarray([3, 7, 9]), np.asarray([0.1, 0.7, 0.9]))
  np.testing.assert_array_equal(tau.for_records(np.asarray([9, 3, 4, 7, 100])),
                                [0.9, 0.1, np.inf, 0.7, np.inf])
  np.testing.assert_array_equal(Threshold(0.25).for_records(np.asarray([1, 2])), [0.25, 0.25])


def test_source_without_samples_gets_infinite_threshold():
  grow = GrowRewards(np.asarray([0, 0, 0, 1]), np.asarray([0.2, 0.6, 1.0, 1.0], np.float32),
                     np.asarray([False, False, True, True]))
  taus, messages = make_schedule("per_source_interpolation", gammas=(0.5,)).plan(
      grow, num_improve_steps=1)
  np.testing.assert_allclose(taus[0].per_source, [0.5, np.inf])
  assert taus[0].value == pytest.approx(0.5) and "1 sources have no samples" in messages[0]


def test_unknown_name_and_bad_parameters():
  with pytest.raises(RestJaxError, match="known schedules: fixed, quantile, linear, "
                     "per_source_percentile, per_source_interpolation"):
    make_schedule("cosine")
  # The config constructor imports no library logic; from_config is the validator.
  with pytest.raises(RestJaxError, match="unknown"):
    schedules.from_config(C.ImproveConfig(schedule="cosine"))
  with pytest.raises(RestJaxError, match="strictly increasing"):
    schedules.from_config(C.ImproveConfig(
        schedule="quantile", schedule_params=C.ScheduleParams(quantiles=(0.9, 0.5))))
  with pytest.raises(RestJaxError, match=r"in \[0, 100\]"):
    make_schedule("per_source_percentile", percentiles=(50, 150))
  with pytest.raises(RestJaxError, match="rising ramp"):
    make_schedule("linear", start=0.9, end=0.5)
  cfg = C.ImproveConfig(schedule="per_source_percentile",
                        schedule_params=C.ScheduleParams(percentiles=[10, 20]))
  assert schedules.from_config(cfg) == schedules.PerSourcePercentile((10.0, 20.0))
  assert isinstance(schedules.from_config(cfg), schedules.Schedule)
