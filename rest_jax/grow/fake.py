"""A deterministic, model-free ``Sampler`` for tests (as ``rewards.base.LengthReward`` is for
rewards): outputs are plain functions of the prompts, example ids and sample indices."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.errors import RestJaxError
from rest_jax.grow.base import SampleOutput
from rest_jax.models.base import EOS_ID, PAD_ID

SampleFn = Callable[[np.ndarray, int, int], Sequence[int]]
GreedyFn = Callable[[np.ndarray], Sequence[int]]


def prompt_tokens(row: np.ndarray) -> np.ndarray:
  """A prompt row's tokens before its first PAD or EOS: int `[input_len]` -> `[k]`."""
  row = np.asarray(row)
  stops = np.flatnonzero((row == PAD_ID) | (row == EOS_ID))
  return row[:stops[0]] if stops.size else row


def _echo_sample(prompt: np.ndarray, example_id: int, sample_idx: int) -> Sequence[int]:
  del example_id, sample_idx
  return prompt


def _echo(prompt: np.ndarray) -> Sequence[int]:
  return prompt


class FakeSampler:
  """Implements ``rest_jax.grow.base.Sampler`` without a model; ``params_state`` is ignored.

  * ``generate``: sample n of prompt b is ``sample_fn(prompt_b, example_id_b, n)`` then EOS;
    every generated token (EOS included) has behaviour log-prob ``sample_logprob``.
  * ``greedy``: the decode of prompt b is ``greedy_fn(prompt_b)`` then EOS.
  * ``score``: every non-PAD target token has log-prob ``score_logprob``.

  ``prompt_b`` is the prompt's tokens before its first PAD or EOS (``prompt_tokens``); both
  functions default to echoing it. Decodes are cut to ``max_decode_len`` tokens (EOS included)
  and padded with PAD after EOS, as the real sampler's are. ``calls`` counts calls per method.
  """

  def __init__(self, num_samples: int = 1, *, max_decode_len: int = 32,
               sample_fn: SampleFn = _echo_sample, greedy_fn: GreedyFn = _echo,
               sample_logprob: float = -0.5, score_logprob: float = -0.25):
    self.num_samples = num_samples
    self.max_decode_len = max_decode_len
    self.sample_fn = sample_fn
    self.greedy_fn = greedy_fn
    self.sample_logprob = sample_logprob
    self.score_logprob = score_logprob
    self.calls: collections.Counter[str] = collections.Counter()

  def _rows(self, decodes: list[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """EOS-terminated, cut and padded token rows int32 `[len(decodes), max_decode_len]` and
    their lengths int32 `[len(decodes)]`."""
    tokens = np.full((len(decodes), self.max_decode_len), PAD_ID, np.int32)
    lengths = np.zeros(len(decodes), np.int32)
    for i, decode in enumerate(decodes):
      row = (list(np.asarray(decode, np.int64)) + [EOS_ID])[:self.max_decode_len]
      tokens[i, :len(row)] = row
      lengths[i] = len(row)
    return tokens, lengths

  def place_params(self, params_state: Any) -> Any:
    return params_state

  def generate(self, params_state: Any, inputs: np.ndarray, example_ids: np.ndarray, *,
               seed: int, grow_step: int, first_sample: int = 0) -> SampleOutput:
    """Rows `[batch * num_samples]`, row b * N + n = prompt b, sample first_sample + n
    (``seed`` and ``grow_step`` are ignored)."""
    del params_state, seed, grow_step
    self.calls["generate"] += 1
    inputs, example_ids = np.asarray(inputs), np.asarray(example_ids, np.int64)
    if example_ids.shape != inputs.shape[:1]:
      raise RestJaxError(f"FakeSampler.generate: {example_ids.shape[0]} example_ids for "
                         f"{inputs.shape[0]} prompts; pass one id per prompt.")
    n = self.num_samples
    indices = range(first_sample, first_sample + n)
    tokens, lengths = self._rows([self.sample_fn(prompt_tokens(row), int(e), k)
                                  for row, e in zip(inputs, example_ids) for k in indices])
    within = np.arange(self.max_decode_len)[None] < lengths[:, None]
    return SampleOutput(tokens=tokens,
                        logprobs=np.where(within, self.sample_logprob, 0.0).astype(np.float32),
                        lengths=lengths, example_ids=np.repeat(example_ids, n),
                        sample_idx=np.tile(np.arange(first_sample, first_sample + n,
                                                     dtype=np.int32), len(example_ids)),
                        num_steps=int(lengths.max(initial=0)))

  def greedy(self, params_state: Any, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 `[batch, max_decode_len]` and lengths int32 `[batch]`."""
    del params_state
    self.calls["greedy"] += 1
    return self._rows([self.greedy_fn(prompt_tokens(row)) for row in np.asarray(inputs)])

  def score(self, params_state: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float32 `[batch, target_len]`: ``score_logprob`` where the target is not PAD, else 0."""
    del params_state
    self.calls["score"] += 1
    targets = np.asarray(targets)
    if targets.shape[0] != np.asarray(inputs).shape[0]:
      raise RestJaxError(f"FakeSampler.score: {targets.shape[0]} targets for "
                         f"{np.asarray(inputs).shape[0]} inputs; pass one target per prompt.")
    return np.where(targets == PAD_ID, 0.0, self.score_logprob).astype(np.float32)
