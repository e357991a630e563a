"""The sampler seam: the ``Sampler`` protocol Grow, evaluation and best-of-N call, and its output.

``rest_jax.grow.sampler.Sampler`` (jitted, sharded, model-backed) implements it;
``rest_jax.grow.fake.FakeSampler`` is a deterministic, model-free one for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Samples on the host; row ``b * num_samples + n`` is prompt b, sample n.

  tokens: int32 `[batch * num_samples, max_decode_len]`, EOS-terminated, 0 after EOS.
  logprobs: float32 `[batch * num_samples, max_decode_len]`, behaviour log-probs (0 after EOS).
  lengths: int32 `[batch * num_samples]`, tokens including EOS.
  example_ids: int64 `[batch * num_samples]`.
  sample_idx: int32 `[batch * num_samples]`.
  num_steps: decode steps the loop ran (it stops once every row has emitted EOS).
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  example_ids: np.ndarray
  sample_idx: np.ndarray
  num_steps: int


@runtime_checkable
class Sampler(Protocol):
  """Samples, greedy-decodes and scores a policy given by its params state.

  ``params_state`` is whatever the implementation decodes with (an ``nnx.State`` for the real
  sampler); ``place_params`` puts it where the sampler wants it, once, before a loop of calls.
  """

  num_samples: int

  def place_params(self, params_state: Any) -> Any:
    """The params state placed for sampling (a no-op where it already is)."""

  def generate(self, params_state: Any, inputs: np.ndarray, example_ids: np.ndarray, *,
               seed: int, grow_step: int, first_sample: int = 0) -> SampleOutput:
    """``num_samples`` samples per prompt, with sample indices ``first_sample`` and up.

    Args:
      params_state: the policy.
      inputs: int32 `[batch, input_len]`, right-padded prompts.
      example_ids: int64 `[batch]`, stable ids in [0, 2**32) that seed each prompt's samples.
      seed: the run's seed.
      grow_step: the Grow step (with seed, example id and sample index it fixes the samples).
      first_sample: the sample index of each prompt's first row (adaptive Grow draws round r
        as indices ``r * N .. r * N + N - 1``: the samples a larger fixed N draws there).
    Returns:
      SampleOutput with rows `[batch * num_samples]`, row b * N + n = prompt b, sample
      first_sample + n.
    """

  def greedy(self, params_state: Any, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decodes: tokens int32 `[batch, max_decode_len]` (0 after EOS) and lengths int32
    `[batch]` (EOS included) of int32 `[batch, input_len]` right-padded prompts."""

  def score(self, params_state: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Teacher-forced log-probs float32 `[batch, target_len]` of int32 `[batch, target_len]`
    right-padded targets given int32 `[batch, input_len]` prompts (0 where the target pads)."""
