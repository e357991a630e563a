"""The reward protocol: R(x, y) in [0, 1] for a batch of (source, hypothesis, reference)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from rest_jax.errors import RestJaxError


@runtime_checkable
class RewardFn(Protocol):
  """Scores hypotheses; ReST assumes rewards normalised to [0, 1]."""

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """Rewards of ``n`` hypotheses.

    Args:
      sources: the `[n]` prompts x.
      hypotheses: the `[n]` continuations y to score.
      references: the `[n]` human targets, or None for reference-free rewards.
    Returns:
      float32 `[n]` in [0, 1].
    """


def validate_rewards(values: object, n: int, name: str) -> np.ndarray:
  """Checks a reward function's output and returns it as float32 `[n]`.

  Raises:
    RestJaxError: wrong shape, non-numeric, NaN/inf, or outside [0, 1]; the message names the
      reward, the first bad example and its value, and the fix.
  """
  try:
    array = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError):
    raise RestJaxError(f"reward {name!r} returned {type(values).__name__} values that are not "
                       "numbers; return a float array of shape [n].") from None
  if array.shape != (n,):
    raise RestJaxError(f"reward {name!r} returned shape {array.shape} for {n} hypotheses; it "
                       f"must return one number per hypothesis, shape ({n},).")
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    i = int(bad[0])
    raise RestJaxError(f"reward {name!r} returned {array[i]} for example {i} ({bad.size} "
                       "non-finite values in all); rewards must be finite numbers in [0, 1]: "
                       "fix the reward function or map failures to 0.")
  bad = np.flatnonzero((array < 0.0) | (array > 1.0))
  if bad.size:
    i = int(bad[0])
    raise RestJaxError(f"reward {name!r} returned {array[i]} for example {i} ({bad.size} values "
                       "outside [0, 1] in all); ReST thresholds assume rewards in [0, 1]: "
                       "normalise the reward to [0, 1] (e.g. divide a 0-100 score by 100) or declare its "
                       "range with RewardConfig.range = (lo, hi).")
  return array.astype(np.float32)


class LengthReward:
  """A reference-free fake for tests: min(len(hypothesis), target_chars) / target_chars."""

  def __init__(self, target_chars: int = 10):
    if target_chars < 1:
      raise ValueError("target_chars must be >= 1")
    self.target_chars = target_chars

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    del sources, references
    return np.asarray([min(len(h), self.target_chars) / self.target_chars for h in hypotheses],
                      dtype=np.float32)


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
