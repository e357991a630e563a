"""Rewards R(x, y) in [0, 1]: the RewardFn protocol, built-in metrics, and validated scoring."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rest_jax.errors import RestJaxError
from rest_jax.rewards.answers import Gsm8kAnswer, MathAnswer
from rest_jax.rewards.base import LengthReward, RewardFn, validate_rewards
from rest_jax.rewards.metrics import Bleu, ChrF, ExactMatch
from rest_jax.rewards.build import (NormalizedReward, build_reward, check_reward_spec,
                                    reward_label)

__all__ = ["Bleu", "ChrF", "ExactMatch", "Gsm8kAnswer", "LengthReward", "MathAnswer",
           "NormalizedReward", "RewardFn", "build_reward", "check_reward_spec", "get_reward",
           "reward_label", "score", "validate_rewards", "REWARDS"]

REWARDS: dict[str, Callable[[], RewardFn]] = {
    "chrf": ChrF,
    "bleu": Bleu,
    "exact_match": ExactMatch,
    "gsm8k_answer": Gsm8kAnswer,  # Final answers after "####" agree (ReST-EM, GSM8K).
    "math_answer": MathAnswer,  # Last \boxed{} answers agree (ReST-EM, MATH).
}


def get_reward(name: str) -> RewardFn:
  """A new instance of the built-in reward called ``name`` (a key of REWARDS).

  Raises:
    RestJaxError: unknown name; the message lists the known ones.
  """
  if name not in REWARDS:
    raise RestJaxError(f"reward {name!r} is unknown; known rewards: {', '.join(sorted(REWARDS))}, "
                       "or 'learned:DIR' (a reward model from rest-jax train-reward), "
                       "'remote:URL' (a reward server) or 'py:module:function' (any callable "
                       "(sources, hypotheses, references) -> float array [n], see "
                       "rest_jax.rewards.base.RewardFn).")
  return REWARDS[name]()


def score(reward_fn: RewardFn, name: str, sources: Sequence[str], hyps: Sequence[str],
          refs: Sequence[str] | None) -> np.ndarray:
  """Calls ``reward_fn`` and validates its output.

  Args:
    reward_fn: the reward.
    name: its name, for error messages.
    sources / hyps / refs: `[n]` prompts, hypotheses and references (refs may be None).
  Returns:
    float32 `[n]` in [0, 1].
  Raises:
    RestJaxError: the reward's output has the wrong shape, is not finite, or leaves [0, 1].
  """
  n = len(hyps)
  if len(sources) != n or (refs is not None and len(refs) != n):
    raise ValueError(f"score({name}): {len(sources)} sources, {n} hypotheses, "
                     f"{None if refs is None else len(refs)} references; they must match")
  return validate_rewards(reward_fn(sources, hyps, refs), n, name)
