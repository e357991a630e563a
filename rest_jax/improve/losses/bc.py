"""Behaviour cloning and reward-weighted BC: pure ``(logits, batch) -> (loss, metrics)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rest_jax.improve.losses.base import Batch, Metrics, target_weights, token_logprobs, token_metrics


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
  return loss, token_metrics(logits, targets, weights, loss)


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
  metrics = token_metrics(logits, targets, weights, loss)
  has_tokens = (weights.sum(axis=-1) > 0).astype(jnp.float32)
  metrics["mean_reward"] = (reward * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)
  return loss, metrics
