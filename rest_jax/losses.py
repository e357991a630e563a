"""Improve-step losses: pure ``(logits, batch) -> (loss, metrics)`` functions.

Every loss sees the same batch (the Grow data after threshold filtering):

  * ``"inputs"``  int32 `[batch, input_len]`, right-padded prompts;
  * ``"targets"`` int32 `[batch, target_len]`, right-padded, ending with EOS (``PAD_ID`` = 0);
  * ``"reward"``  float32 `[batch]`, the sequence reward in [0, 1];
  * ``"behaviour_logprobs"`` float32 `[batch, target_len]`, recorded at Grow time;
  * ``"is_original"`` int32 `[batch]`, 1 for pairs of the original dataset D.

Token weights are ``targets != PAD_ID``. Losses are averaged over the target tokens of the whole
(global) batch, so a sharded batch gives the numbers of an unsharded one. New losses are added
with ``register_loss`` (or by extending ``LOSSES``) and selected by name with ``get_loss``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from rest_jax.errors import RestJaxError
from rest_jax.models.base import PAD_ID

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probabilities of the target tokens.

  Args:
    logits: `[batch, target_len, vocab]` (any float dtype; computed in float32).
    targets: int32 `[batch, target_len]`.
  Returns:
    float32 `[batch, target_len]`: ``log softmax(logits)[b, t, targets[b, t]]``.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def target_weights(targets: jax.Array) -> jax.Array:
  """float32 `[batch, target_len]`: 1 on target tokens, 0 on padding."""
  return (targets != PAD_ID).astype(jnp.float32)


def _token_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                   loss: jax.Array) -> Metrics:
  num_tokens = weights.sum()
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  return {
      "loss": loss,
      "token_accuracy": correct.sum() / jnp.maximum(num_tokens, 1.0),
      "num_tokens": num_tokens,
  }


def bc_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
  """Behaviour cloning: token-level negative log-likelihood.

  ``loss = -sum_{b,t} w[b,t] log pi(targets[b,t]) / sum_{b,t} w[b,t]`` with ``w = targets != 0``
  (0 when the batch has no target token).

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: needs ``"targets"`` int32 `[batch, target_len]`.
  Returns:
    the scalar loss and metrics {loss, token_accuracy, num_tokens}.
  """
  targets = batch["targets"]
  weights = target_weights(targets)
  nll = -(token_logprobs(logits, targets) * weights).sum()
  loss = nll / jnp.maximum(weights.sum(), 1.0)
  return loss, _token_metrics(logits, targets, weights, loss)


def reward_weighted_bc_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
  """Reward-weighted BC (ReST-EM's M-step): ``-R(x, y) * sum_t log pi(y_t)``.

  Normalised like ``bc_loss``: the reward-weighted sum of token NLLs over the batch divided by the
  number of target tokens of the batch.

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: needs ``"targets"`` int32 `[batch, target_len]` and ``"reward"`` float32 `[batch]`.
  Returns:
    the scalar loss and metrics {loss, token_accuracy, num_tokens, mean_reward}.
  """
  targets = batch["targets"]
  weights = target_weights(targets)
  reward = batch["reward"].astype(jnp.float32)
  nll = -(token_logprobs(logits, targets) * weights).sum(axis=-1)  # [batch]
  loss = (reward * nll).sum() / jnp.maximum(weights.sum(), 1.0)
  metrics = _token_metrics(logits, targets, weights, loss)
  has_tokens = (weights.sum(axis=-1) > 0).astype(jnp.float32)
  metrics["mean_reward"] = (reward * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)
  return loss, metrics


LOSSES: dict[str, LossFn] = {
    "bc": bc_loss,
    "reward_weighted_bc": reward_weighted_bc_loss,
}


def register_loss(name: str, fn: LossFn) -> None:
  """Adds a loss to the registry under ``name`` (an existing name is an error)."""
  if name in LOSSES and LOSSES[name] is not fn:
    raise RestJaxError(f"a loss named {name!r} is already registered; pick another name.")
  LOSSES[name] = fn


def get_loss(name: str) -> LossFn:
  """The loss registered under ``name``."""
  if name not in LOSSES:
    raise RestJaxError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}. "
                       "Set TrainConfig.loss to one of them (or register a new one with "
                       "rest_jax.losses.register_loss).")
  return LOSSES[name]
