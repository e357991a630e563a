"""Reward specs -> RewardFns: built-in names, "learned:DIR", "remote:URL", "py:module:fn".

``RunConfig.reward`` is one spec string (``"chrf"`` stays valid); ``RunConfig.reward_config``
(a RewardConfig) holds the declared range and the remote / learned settings. Every built reward
is wrapped in ``NormalizedReward`` when its declared range is not (0, 1).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.config import RewardConfig
from rest_jax.errors import RestJaxError
from rest_jax.rewards.answers import Gsm8kAnswer, MathAnswer
from rest_jax.rewards.base import RewardFn
from rest_jax.rewards.metrics import Bleu, ChrF, ExactMatch
from rest_jax.rewards.pycall import PREFIX as PY_PREFIX, load_callable
from rest_jax.rewards.remote import PREFIX as REMOTE_PREFIX, RemoteReward

LEARNED_PREFIX = "learned:"

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


class NormalizedReward:
  """Maps a reward with declared range (lo, hi) to (v - lo) / (hi - lo); validation follows."""

  def __init__(self, fn: RewardFn, lo: float, hi: float):
    self.fn, self.lo, self.hi = fn, lo, hi

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float64 `[n]`; values outside [0, 1] stay there for validate_rewards to report."""
    try:
      values = np.asarray(self.fn(sources, hypotheses, references), dtype=np.float64)
    except (TypeError, ValueError):
      raise RestJaxError(f"reward returned values that are not numbers (declared range "
                         f"{(self.lo, self.hi)}); return a float array of shape [n].") from None
    return (values - self.lo) / (self.hi - self.lo)


def reward_label(spec: str, config: RewardConfig) -> str:
  """The name used in error messages: the spec, plus the range when it is not (0, 1)."""
  return spec if config.range == (0.0, 1.0) else f"{spec} with declared range {config.range}"


def check_reward_spec(spec: str) -> None:
  """Fails fast on a spec that cannot be built (without loading models or calling servers)."""
  if spec.startswith(LEARNED_PREFIX):
    directory = spec[len(LEARNED_PREFIX):]
    from rest_jax.rewards.learned import read_meta  # pylint: disable=g-import-not-at-top
    read_meta(directory)
  elif spec.startswith(REMOTE_PREFIX):
    RemoteReward(spec[len(REMOTE_PREFIX):])
  elif spec.startswith(PY_PREFIX):
    load_callable(spec[len(PY_PREFIX):])
  elif spec not in REWARDS:
    get_reward(spec)  # Raises, listing the names and the other spec forms.


def build_reward(spec: str, config: RewardConfig = RewardConfig(), *,
                 layout: Any = None) -> RewardFn:
  """The RewardFn of ``spec`` (see the module docstring), normalised by ``config.range``.

  Raises:
    RestJaxError: unknown name, missing reward-model directory, bad URL or import path, or a
      token_env that is not set.
  """
  if spec.startswith(LEARNED_PREFIX):
    from rest_jax.rewards.learned import LearnedReward  # pylint: disable=g-import-not-at-top
    fn = LearnedReward(os.path.expanduser(spec[len(LEARNED_PREFIX):]),
                       batch_size=config.batch_size, layout=layout)
  elif spec.startswith(REMOTE_PREFIX):
    fn = RemoteReward(spec[len(REMOTE_PREFIX):], timeout_s=config.timeout_s,
                      max_retries=config.max_retries, backoff_s=config.backoff_s,
                      max_concurrency=config.max_concurrency,
                      request_batch_size=config.request_batch_size, token_env=config.token_env)
  elif spec.startswith(PY_PREFIX):
    fn = load_callable(spec[len(PY_PREFIX):])
  else:
    fn = get_reward(spec)
  if config.range != (0.0, 1.0):
    fn = NormalizedReward(fn, *config.range)
  return fn
