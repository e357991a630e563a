"""Rewards R(x, y) in [0, 1]: the RewardFn protocol, built-in metrics, and validated scoring."""

from __future__ import annotations

from rest_jax.rewards.answers import Gsm8kAnswer, MathAnswer
from rest_jax.rewards.base import LengthReward, RewardFn, score, validate_rewards
from rest_jax.rewards.build import (REWARDS, NormalizedReward, build_reward, check_reward_spec,
                                    get_reward, reward_label)
from rest_jax.rewards.metrics import Bleu, ChrF, ExactMatch

__all__ = ["Bleu", "ChrF", "ExactMatch", "Gsm8kAnswer", "LengthReward", "MathAnswer",
           "NormalizedReward", "RewardFn", "build_reward", "check_reward_spec", "get_reward",
           "reward_label", "score", "validate_rewards", "REWARDS"]
