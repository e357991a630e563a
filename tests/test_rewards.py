"""Rewards against hand-computed values, and the validation of reward outputs."""

from __future__ import annotations

import numpy as np
import pytest

from rest_jax import rewards
from rest_jax.errors import RestJaxError
from rest_jax.rewards import LengthReward, RewardFn, get_reward, score, validate_rewards


def test_chrf_identical_is_one_and_hand_value():
  chrf = get_reward("chrf")
  out = chrf(["x", "x"], ["twenty-three", "ab"], ["twenty-three", "abc"])
  assert out.dtype == np.float32
  # "ab" vs "abc": 1-grams P=1, R=2/3; 2-grams P=1, R=1/2 (no hypothesis 3..6-grams).
  # Mean P=1, mean R=7/12; F_2 = 5 * P * R / (4 * P + R) = 7/11.
  np.testing.assert_allclose(out, [1.0, 7 / 11], rtol=1e-6)


def test_bleu_hand_value_and_identical():
  bleu = get_reward("bleu")
  out = bleu(["x"] * 3, ["a b c d", "five", "a b c d"], ["a b c d e", "five", "a b c d"])
  # All n-gram precisions are 1 (effective order); brevity penalty exp(1 - 5/4).
  np.testing.assert_allclose(out, [np.exp(-0.25), 1.0, 1.0], rtol=1e-6)
  assert out.max() <= 1.0  # sacrebleu gives 100.00000000000004 for "five": clipped.


def test_exact_match_strips():
  em = get_reward("exact_match")
  np.testing.assert_array_equal(em(["", "", ""], [" 12 ", "13", ""], ["12", "12", ""]),
                                [1.0, 0.0, 1.0])


def test_reference_metrics_need_references():
  with pytest.raises(RestJaxError, match="references"):
    get_reward("chrf")(["x"], ["y"], None)


def test_length_reward_fake():
  fake = LengthReward(target_chars=4)
  assert isinstance(fake, RewardFn)
  np.testing.assert_allclose(fake(["a"] * 3, ["", "ab", "abcdefg"], None), [0.0, 0.5, 1.0])


def test_get_reward_unknown_lists_names():
  with pytest.raises(RestJaxError) as info:
    get_reward("rouge")
  assert "bleu" in str(info.value) and "chrf" in str(info.value) and "exact_match" in str(
      info.value)
  assert set(rewards.REWARDS) >= {"chrf", "bleu", "exact_match", "gsm8k_answer", "math_answer"}


def test_validate_rewards_accepts_and_casts():
  out = validate_rewards([0, 0.5, 1], 3, "mine")
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, [0.0, 0.5, 1.0])


def test_validate_rewards_nan():
  with pytest.raises(RestJaxError) as info:
    validate_rewards(np.array([0.2, np.nan, 0.1]), 3, "mine")
  message = str(info.value)
  assert "'mine'" in message and "example 1" in message and "nan" in message


def test_validate_rewards_out_of_range():
  with pytest.raises(RestJaxError) as info:
    validate_rewards([0.2, 0.3, 1.5, 2.0], 4, "mine")
  message = str(info.value)
  assert "example 2" in message and "1.5" in message and "normalise" in message


def test_validate_rewards_shape_and_type():
  with pytest.raises(RestJaxError, match=r"shape \(2,\) for 3"):
    validate_rewards([0.1, 0.2], 3, "mine")
  with pytest.raises(RestJaxError, match="not numbers"):
    validate_rewards(["a", "b"], 2, "mine")


def test_score_validates():
  np.testing.assert_array_equal(
      score(get_reward("exact_match"), "exact_match", ["1+1="], ["2"], ["2"]), [1.0])
  with pytest.raises(RestJaxError, match="'percent'"):
    score(lambda s, h, r: np.full(len(h), 50.0), "percent", ["a"], ["b"], ["c"])
