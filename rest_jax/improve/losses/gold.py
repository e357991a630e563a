"""GOLD (Pang and He, 2021): off-policy policy gradient on the filtered pairs.

``loss = -sum_t w_t * Q_t * log pi_theta(y_t | s_t) / num_tokens`` with per-token importance
weights ``w_t = stopgrad(max(pi_theta(y_t | s_t), u))`` and returns ``Q_t`` from the frozen BC
policy: ``Q_t = sum_{j < k} discount**j * r_{t+j}``, ``r_t = max(pi_BC(y_t | s_t), r_min)``
("prob", GOLD-p) or ``max(log pi_BC(y_t | s_t) - baseline, r_min)`` ("logprob", GOLD-s), and
``r = 0`` past the end of the sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rest_jax.config import GoldConfig
from rest_jax.improve.losses.base import (NEEDS_BC_LOGPROBS, Batch, Loss, LossParams, Metrics, require,
                                  target_weights, token_logprobs, token_mean, token_metrics)


def gold_returns(bc_logprobs: jax.Array, weights: jax.Array, cfg: GoldConfig) -> jax.Array:
  """Per-token k-step returns of the frozen BC policy.

  Args:
    bc_logprobs: float32 `[batch, target_len]`, log pi_BC(y_t | s_t).
    weights: float32 `[batch, target_len]`, 1 on target tokens.
    cfg: the GOLD hyperparameters.
  Returns:
    float32 `[batch, target_len]`: ``Q_t`` (0 on padding).
  """
  if cfg.reward == "prob":
    rewards = jnp.exp(bc_logprobs)
  else:
    rewards = bc_logprobs - cfg.log_reward_baseline
  rewards = jnp.maximum(rewards, cfg.reward_min) * weights
  length = rewards.shape[1]
  padded = jnp.pad(rewards, ((0, 0), (0, cfg.horizon)))
  returns = sum(cfg.discount ** j * padded[:, j:j + length] for j in range(cfg.horizon))
  return returns * weights


def gold_loss(logits: jax.Array, batch: Batch, cfg: GoldConfig) -> tuple[jax.Array, Metrics]:
  """The GOLD loss (see the module docstring).

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: ``"targets"`` int32 `[batch, target_len]` and ``"bc_logprobs"`` float32
      `[batch, target_len]`.
    cfg: the GOLD hyperparameters.
  Returns:
    the scalar loss and metrics {loss, token_accuracy, num_tokens, mean_return, mean_weight}.
  """
  require(batch, "bc_logprobs", loss="gold")
  targets = batch["targets"]
  weights = target_weights(targets)
  logp = token_logprobs(logits, targets)
  importance = jax.lax.stop_gradient(jnp.maximum(jnp.exp(logp), cfg.weight_floor))
  returns = jax.lax.stop_gradient(gold_returns(batch["bc_logprobs"], weights, cfg))
  loss = -token_mean(importance * returns * logp, weights)
  metrics = token_metrics(logits, targets, weights, loss)
  metrics["mean_return"] = token_mean(returns, weights)
  metrics["mean_weight"] = token_mean(importance, weights)
  return loss, metrics


def make_gold(cfg: GoldConfig) -> Loss:
  """The GOLD ``Loss``: needs the frozen BC policy's per-token log-probs."""

  def fn(logits: jax.Array, batch: Batch, loss_params: LossParams):
    del loss_params
    return gold_loss(logits, batch, cfg)

  return Loss(fn=fn, needs=frozenset({NEEDS_BC_LOGPROBS}))
