"""Held-out evaluation: greedy decodes of D_eval scored by the reward and by exact match.

The same function evaluates the validation split (keys "eval_*": every selection reads them)
and the test split (keys "test_*": reported, never selected on); ``make_eval_fn``'s ``prefix``
names which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.errors import RestJaxError
from rest_jax.grow.base import Sampler
from rest_jax.rewards.metrics import ExactMatch
from rest_jax.tasks.data import detokenize, pad_rows

_EXACT_MATCH = ExactMatch()

# ``eval_fn(params) -> {"eval_reward", "eval_exact_match"[, "eval_independent"]}`` (or with
# the "test_" prefix for the test split).
EvalFn = Callable[[Any], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """D_eval as arrays: inputs `[num_examples, input_len]` and the texts to score against."""

  inputs: np.ndarray
  sources: list[str]
  references: list[str]

  @classmethod
  def from_examples(cls, examples: Sequence[dict], *, input_len: int) -> "EvalSet":
    return cls(inputs=pad_rows([e["inputs"] for e in examples], input_len),
               sources=[e["inputs_pretokenized"] for e in examples],
               references=[e["targets_pretokenized"] for e in examples])


# The independent metric chosen by EvalConfig.independent_metric = "auto", by training reward.
AUTO_INDEPENDENT = {"chrf": "bleu", "bleu": "chrf", "exact_match": "chrf"}
AUTO_INDEPENDENT_DEFAULT = "bleu"


def independent_metric_name(reward: str, setting: str) -> str | None:
  """The reward-hacking monitor's metric: ``setting`` ("auto", "none" or a reward name).

  "auto" picks bleu for a chrF reward, chrF for bleu or exact_match rewards, bleu otherwise;
  "none" turns the monitor off (None).

  Raises:
    RestJaxError: the metric is the training reward itself (it would not be independent).
  """
  if setting == "none":
    return None
  name = AUTO_INDEPENDENT.get(reward, AUTO_INDEPENDENT_DEFAULT) if setting == "auto" else setting
  if name == reward:
    raise RestJaxError(f"EvalConfig.independent_metric {name!r} is the training reward; pick a "
                       "different metric (e.g. 'bleu' or 'chrf'), 'auto', or 'none'.")
  return name


def standard_error(scores: np.ndarray) -> float:
  """The standard error of the mean of per-example scores `[n]`: std (ddof 1) / sqrt(n).

  It is what a bootstrap over the eval set estimates (the spread of the mean over resampled
  eval sets), in closed form; 0.0 for fewer than two scores.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.size < 2:
    return 0.0
  return float(np.std(scores, ddof=1) / np.sqrt(scores.size))


def make_eval_fn(*, sampler: Sampler, eval_set: EvalSet, reward: Callable[..., np.ndarray],
                 vocab: Any, batch_size: int,
                 independent: Callable[..., np.ndarray] | None = None,
                 prefix: str = "eval") -> EvalFn:
  """Returns ``eval_fn(params) -> {"eval_reward", "eval_exact_match"[, "eval_independent"]}``
  on greedy decodes.

  Args:
    sampler: a ``Sampler``; its ``greedy(params, inputs)`` gives `[batch, max_len]` tokens.
    eval_set: the held-out prompts and references.
    reward: ``reward(sources, hypotheses, references) -> [n]`` validated rewards in [0, 1].
    vocab: the target vocabulary (``decode(ids) -> str``).
    batch_size: prompts per greedy call.
    independent: an independent metric ``(sources, hypotheses, references) -> [n]`` in [0, 1]
      (the reward-hacking monitor): its mean is reported as "{prefix}_independent" and the
      standard error of that mean over the eval set as "{prefix}_independent_se".
    prefix: the keys' prefix: "eval" (validation) or "test".
  """

  def eval_fn(params: Any) -> dict[str, float]:
    hypotheses = decode_all(sampler, params, eval_set.inputs, vocab, batch_size)
    rewards = reward(eval_set.sources, hypotheses, eval_set.references)
    matches = _EXACT_MATCH(eval_set.sources, hypotheses, eval_set.references)
    out = {f"{prefix}_reward": float(np.mean(rewards)),
           f"{prefix}_exact_match": float(np.mean(matches))}
    if independent is not None:
      scores = np.asarray(independent(eval_set.sources, hypotheses, eval_set.references),
                          dtype=np.float64)
      out[f"{prefix}_independent"] = float(np.mean(scores))
      out[f"{prefix}_independent_se"] = standard_error(scores)
    return out

  return eval_fn


def decode_all(sampler: Sampler, params: Any, inputs: np.ndarray, vocab: Any,
               batch_size: int) -> list[str]:
  """Greedy-decodes every row of `[num_examples, input_len]` and returns the texts."""
  texts: list[str] = []
  for start in range(0, len(inputs), batch_size):
    tokens, lengths = sampler.greedy(params, inputs[start:start + batch_size])
    texts.extend(detokenize(vocab, tokens, lengths))
  return texts
