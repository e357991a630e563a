"""What a run has spent, counted the same way for ReST, semi-online and online.

Every summary row carries the run's cumulative counts up to its phase:

  * ``samples_drawn``: samples drawn from the policy (Grow samples, online samples; the
    demonstrations of D and the evaluations are not counted);
  * ``sampled_tokens``: ``samples x (input_len + max_decode_len)``, the padded tokens the
    sampler's prefill and decode process per sample (an upper bound: decoding stops once
    every row of a batch has emitted EOS);
  * ``trained_tokens``: ``steps x batch_size x (input_len + target_len)``, the padded tokens
    of every training batch (BC, Improve, online steps);
  * ``flops``: ``2 x params x sampled_tokens + 6 x params x trained_tokens`` (forward only for
    sampling, forward and backward for training; attention's quadratic term is left out).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Cost:
  """Cumulative counts (see the module docstring); ``+`` adds two."""

  samples_drawn: int = 0
  sampled_tokens: int = 0
  trained_tokens: int = 0
  flops: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(*(getattr(self, f.name) + getattr(other, f.name)
                  for f in dataclasses.fields(self)))

  def as_row(self) -> dict[str, float]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def num_params(params) -> int:
  """Scalars in a params pytree (concrete or abstract leaves with ``.shape``)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def sampling(num_samples: int, *, input_len: int, decode_len: int, params: int) -> Cost:
  """Drawing ``num_samples`` samples of at most ``decode_len`` tokens after a prompt."""
  tokens = int(num_samples) * (input_len + decode_len)
  return Cost(samples_drawn=int(num_samples), sampled_tokens=tokens,
              flops=2.0 * params * tokens)


def training(steps: int, *, batch_size: int, input_len: int, target_len: int,
             params: int) -> Cost:
  """``steps`` optimizer steps of ``batch_size`` sequences."""
  tokens = int(steps) * batch_size * (input_len + target_len)
  return Cost(trained_tokens=tokens, flops=6.0 * params * tokens)
