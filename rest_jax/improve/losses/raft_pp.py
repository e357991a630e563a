"""Clipped, importance-weighted BC (RAFT++, Xiong et al., 2025) on the kept Grow records.

The Grow records are samples of an earlier policy pi_b whose per-token log-probs are stored
(``"behaviour_logprobs"``: the distribution actually sampled, after temperature / top-k /
top-p). RAFT++ corrects BC on them with the ratio rho = pi_theta / pi_b and PPO's clip, taking
advantage 1 for every kept record:

  * ``ratio = "token"``: rho_t = exp(log pi_theta(y_t | s_t) - log pi_b(y_t | s_t));
    ``"sequence"``: one rho per sequence, exp(sum_t (log pi_theta - log pi_b)), on its tokens.
  * ``clip = "ppo"``: w = rho where rho <= 1 + clip_high, else 0 (PPO's clipped surrogate with
    a positive advantage: no gradient above the range, none clipped below it).
    ``clip = "truncate"``: w = clip(rho, 1 - clip_low, 1 + clip_high) (truncated importance
    sampling: every token trains, with a bounded weight).

``loss = -sum_{b,t} stopgrad(w[b,t]) log pi_theta(y_t | s_t) * m[b,t] / sum m`` (m = target
tokens): its gradient is RAFT++'s, and with pi_theta = pi_b (rho = 1, w = 1) it is BC's loss.
Ratios are clipped in log space, so a long sequence's ratio never overflows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rest_jax.config import RaftPpConfig
from rest_jax.improve.losses.base import (Batch, Loss, LossParams, Metrics, require,
                                          target_weights, token_logprobs, token_mean,
                                          token_metrics)


def raft_pp_weights(logp: jax.Array, behaviour_logprobs: jax.Array, weights: jax.Array,
                    cfg: RaftPpConfig) -> tuple[jax.Array, jax.Array]:
  """The importance weights of the RAFT++ loss (no gradient flows through them).

  Args:
    logp: float32 `[batch, target_len]`, log pi_theta(y_t | s_t).
    behaviour_logprobs: float32 `[batch, target_len]`, log pi_b(y_t | s_t).
    weights: float32 `[batch, target_len]`, 1 on target tokens.
    cfg: the ratio level and clip.
  Returns:
    float32 `[batch, target_len]` weights w (see the module docstring; 0 on padding) and
    float32 `[batch, target_len]` 1 where the ratio lies outside the clip range (0 on padding).
  """
  log_ratio = (logp - behaviour_logprobs.astype(jnp.float32)) * weights
  if cfg.ratio == "sequence":
    log_ratio = jnp.broadcast_to(log_ratio.sum(axis=-1, keepdims=True), log_ratio.shape)
  log_ratio = jax.lax.stop_gradient(log_ratio)
  high, low = math.log1p(cfg.clip_high), math.log1p(-cfg.clip_low)
  above = log_ratio > high
  if cfg.clip == "ppo":
    w = jnp.where(above, 0.0, jnp.exp(jnp.minimum(log_ratio, high)))
    outside = above
  else:
    w = jnp.exp(jnp.clip(log_ratio, low, high))
    outside = above | (log_ratio < low)
  return w * weights, outside.astype(jnp.float32) * weights


def raft_pp_loss(logits: jax.Array, batch: Batch,
                 cfg: RaftPpConfig) -> tuple[jax.Array, Metrics]:
  """The RAFT++ loss (see the module docstring).

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: ``"targets"`` int32 `[batch, target_len]` and ``"behaviour_logprobs"`` float32
      `[batch, target_len]`.
    cfg: the ratio level and clip.
  Returns:
    the scalar loss and metrics {loss, token_accuracy, num_tokens, mean_weight,
    clip_fraction} (clip_fraction: the share of target tokens whose ratio lies outside the
    range).
  """
  require(batch, "behaviour_logprobs", loss="raft_pp")
  targets = batch["targets"]
  weights = target_weights(targets)
  logp = token_logprobs(logits, targets)
  w, outside = raft_pp_weights(logp, batch["behaviour_logprobs"], weights, cfg)
  loss = -token_mean(w * logp, weights)
  metrics = token_metrics(logits, targets, weights, loss)
  metrics["mean_weight"] = token_mean(w, weights)
  metrics["clip_fraction"] = token_mean(outside, weights)
  return loss, metrics


def make_raft_pp(cfg: RaftPpConfig) -> Loss:
  """The RAFT++ ``Loss``: reads the batch's stored behaviour log-probs, needs no pre-pass."""

  def fn(logits: jax.Array, batch: Batch, loss_params: LossParams):
    del loss_params
    return raft_pp_loss(logits, batch, cfg)

  return Loss(fn=fn)
