"""Held-out evaluation: greedy decodes of D_eval scored by the reward and by exact match."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.models.base import EOS_ID, PAD_ID
from rest_jax.rewards import ExactMatch

_EXACT_MATCH = ExactMatch()


def pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  """Right-pads 1-D token arrays with PAD_ID into int32 `[len(rows), length]`."""
  out = np.full((len(rows), length), PAD_ID, dtype=np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row)[:length]
    out[i, :len(row)] = row
  return out


def detokenize(vocab: Any, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Decodes `[batch, max_len]` token ids, keeping `lengths[b]` tokens and dropping EOS."""
  texts = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)] if t not in (EOS_ID, PAD_ID)]
    texts.append(vocab.decode(ids))
  return texts


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


def make_eval_fn(*, sampler: Any, eval_set: EvalSet, reward: Callable[..., np.ndarray],
                 vocab: Any, batch_size: int) -> Callable[[Any], dict[str, float]]:
  """Returns ``eval_fn(params) -> {"eval_reward", "eval_exact_match"}`` on greedy decodes.

  Args:
    sampler: a ``Sampler``; its ``greedy(params, inputs)`` gives `[batch, max_len]` tokens.
    eval_set: the held-out prompts and references.
    reward: ``reward(sources, hypotheses, references) -> [n]`` validated rewards in [0, 1].
    vocab: the target vocabulary (``decode(ids) -> str``).
    batch_size: prompts per greedy call.
  """

  def eval_fn(params: Any) -> dict[str, float]:
    hypotheses = decode_all(sampler, params, eval_set.inputs, vocab, batch_size)
    rewards = reward(eval_set.sources, hypotheses, eval_set.references)
    matches = _EXACT_MATCH(eval_set.sources, hypotheses, eval_set.references)
    return {"eval_reward": float(np.mean(rewards)), "eval_exact_match": float(np.mean(matches))}

  return eval_fn


def decode_all(sampler: Any, params: Any, inputs: np.ndarray, vocab: Any,
               batch_size: int) -> list[str]:
  """Greedy-decodes every row of `[num_examples, input_len]` and returns the texts."""
  texts: list[str] = []
  for start in range(0, len(inputs), batch_size):
    tokens, lengths = sampler.greedy(params, inputs[start:start + batch_size])
    texts.extend(detokenize(vocab, tokens, lengths))
  return texts
