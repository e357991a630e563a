"""Losses with a behaviour value function: OAC and BVMPO (behaviour V-MPO).

Both read ``"values"`` V(s_t) and ``"returns"`` discount**(T - t) * R (from the pre-pass) and use
the advantage ``A_t = returns_t - V(s_t)``, a constant for the policy (the value network is its
own, frozen during Improve).

* OAC (offline actor-critic, no V-trace): ``-sum_t A_t log pi(y_t | s_t) / num_tokens``.
* BVMPO (Song et al., 2019, V-MPO, on offline data): over the batch's target tokens, keep the top
  ``top_fraction`` of advantages; ``psi = softmax(A / eta)`` over them;

    L_pi    = -sum_top psi * log pi(y_t | s_t)
    L_eta   = eta * eps_eta + eta * log mean_top exp(A / eta)
    L_alpha = alpha * (eps_alpha - stopgrad(KL_start)) + stopgrad(alpha) * KL_start
    L_bkl   = lambda_step * KL_behaviour

  with ``KL_start`` the token-mean of KL(pi_start || pi_theta) over the vocabulary (pi_start is the
  policy this phase started from), ``KL_behaviour`` the token-mean of the sample estimate
  ``log pi_behaviour(y_t) - log pi_theta(y_t)`` (the targets are the behaviour policy's samples),
  and ``lambda_step = kl_start * (kl_end / kl_start) ** (step / num_steps)``. The multipliers are
  ``eta = softplus(raw_eta)`` and ``alpha = softplus(raw_alpha)``, learned by their own Adam.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from rest_jax.config import BvmpoConfig, OacConfig
from rest_jax.improve.losses.base import (NEEDS_START_LOGPROBS, NEEDS_VALUES, Batch, Loss, LossParams,
                                  Metrics, require, target_weights, token_logprobs, token_mean,
                                  token_metrics)


def advantages(batch: Batch, weights: jax.Array) -> jax.Array:
  """float32 `[batch, target_len]`: ``(returns - values) * weights``, no gradient."""
  adv = (batch["returns"].astype(jnp.float32) - batch["values"].astype(jnp.float32)) * weights
  return jax.lax.stop_gradient(adv)


def oac_loss(logits: jax.Array, batch: Batch, cfg: OacConfig) -> tuple[jax.Array, Metrics]:
  """Offline actor-critic.

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: ``"targets"``, ``"values"`` and ``"returns"`` (each `[batch, target_len]`).
    cfg: the OAC hyperparameters.
  Returns:
    the scalar loss and metrics {loss, token_accuracy, num_tokens, mean_advantage}.
  """
  require(batch, "values", "returns", loss="oac")
  targets = batch["targets"]
  weights = target_weights(targets)
  adv = advantages(batch, weights)
  mean_adv = token_mean(adv, weights)
  if cfg.normalize_advantages:
    std = jnp.sqrt(token_mean((adv - mean_adv) ** 2, weights))
    adv = adv / (std + 1e-6)
  loss = -token_mean(adv * token_logprobs(logits, targets), weights)
  metrics = token_metrics(logits, targets, weights, loss)
  metrics["mean_advantage"] = mean_adv
  return loss, metrics


def _inverse_softplus(x: float) -> float:
  return math.log(math.expm1(x))


def bvmpo_init_params(cfg: BvmpoConfig) -> LossParams:
  """The learnable multipliers' raw values: softplus(raw) = the configured initial value."""
  return {"raw_eta": jnp.float32(_inverse_softplus(cfg.init_eta)),
          "raw_alpha": jnp.float32(_inverse_softplus(cfg.init_alpha))}


def top_mask(adv: jax.Array, weights: jax.Array, fraction: float) -> jax.Array:
  """bool `[batch, target_len]`: target tokens whose advantage is among the top ``fraction``.

  ``k = max(ceil(fraction * num_tokens), 1)``; ties with the k-th largest are kept.
  """
  valid = weights > 0
  flat = jnp.where(valid, adv, -jnp.inf).ravel()
  ranked = -jnp.sort(-flat)
  k = jnp.maximum(jnp.ceil(fraction * valid.sum()).astype(jnp.int32), 1)
  threshold = ranked[k - 1]
  return valid & (adv >= threshold)


def bvmpo_loss(logits: jax.Array, batch: Batch, loss_params: LossParams, cfg: BvmpoConfig, *,
               num_steps: int) -> tuple[jax.Array, Metrics]:
  """Behaviour V-MPO (see the module docstring).

  Args:
    logits: `[batch, target_len, vocab]`.
    batch: ``"targets"``, ``"values"``, ``"returns"``, ``"behaviour_logprobs"`` (each
      `[batch, target_len]`), ``"start_logprobs"`` `[batch, target_len, vocab]`, ``"step"``.
    loss_params: {"raw_eta", "raw_alpha"} float32 scalars.
    cfg: the BVMPO hyperparameters.
    num_steps: the phase's optimizer steps (the KL-to-behaviour annealing horizon).
  Returns:
    the scalar loss and metrics (loss, its parts, eta, alpha, the KLs, lambda).
  """
  require(batch, "values", "returns", "start_logprobs", loss="bvmpo")
  targets = batch["targets"]
  weights = target_weights(targets)
  log_policy = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(log_policy, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  adv = advantages(batch, weights)
  top = top_mask(adv, weights, cfg.top_fraction)
  num_top = top.sum()
  eta = jax.nn.softplus(loss_params["raw_eta"])
  alpha = jax.nn.softplus(loss_params["raw_alpha"])

  # Policy: psi = softmax(A / eta) over the top tokens (eta without gradient here).
  scaled = jnp.where(top, adv / jax.lax.stop_gradient(eta), -jnp.inf)
  shift = jnp.max(jnp.where(top, scaled, -1e30))
  psi = jnp.where(top, jnp.exp(scaled - shift), 0.0)
  psi = psi / jnp.maximum(psi.sum(), 1e-30)
  policy_loss = -(psi * logp).sum()

  # Temperature: eta * eps_eta + eta * log mean_top exp(A / eta).
  has_top = num_top > 0
  mask = jnp.where(has_top, top, True).astype(jnp.float32)
  log_mean = jax.nn.logsumexp(adv / eta, b=mask) - jnp.log(jnp.maximum(num_top, 1))
  eta_loss = eta * cfg.eps_eta + jnp.where(has_top, eta * log_mean, 0.0)

  # Trust region to the phase's starting policy, with a learned multiplier.
  start = batch["start_logprobs"].astype(jnp.float32)
  kl_start = token_mean((jnp.exp(start) * (start - log_policy)).sum(-1), weights)
  alpha_loss = (alpha * (cfg.eps_alpha - jax.lax.stop_gradient(kl_start))
                + jax.lax.stop_gradient(alpha) * kl_start)

  # KL(pi_behaviour || pi_theta), sample estimate on the behaviour policy's tokens, annealed.
  kl_behaviour = token_mean(batch["behaviour_logprobs"].astype(jnp.float32) - logp, weights)
  progress = jnp.clip(batch["step"].astype(jnp.float32) / num_steps, 0.0, 1.0)
  kl_weight = cfg.kl_start * (cfg.kl_end / cfg.kl_start) ** progress

  loss = policy_loss + eta_loss + alpha_loss + kl_weight * kl_behaviour
  metrics = token_metrics(logits, targets, weights, loss)
  metrics.update(policy_loss=policy_loss, eta_loss=eta_loss, alpha_loss=alpha_loss, eta=eta,
                 alpha=alpha, kl_start=kl_start, kl_behaviour=kl_behaviour, kl_weight=kl_weight,
                 mean_advantage=token_mean(adv, weights),
                 top_tokens=num_top.astype(jnp.float32))
  return loss, metrics


def make_oac(cfg: OacConfig) -> Loss:
  """The OAC ``Loss``: needs values and returns."""

  def fn(logits: jax.Array, batch: Batch, loss_params: LossParams):
    del loss_params
    return oac_loss(logits, batch, cfg)

  return Loss(fn=fn, needs=frozenset({NEEDS_VALUES}))


def make_bvmpo(cfg: BvmpoConfig, *, num_steps: int) -> Loss:
  """The BVMPO ``Loss``: needs values, returns and the starting policy; learns eta and alpha."""

  def fn(logits: jax.Array, batch: Batch, loss_params: LossParams):
    return bvmpo_loss(logits, batch, loss_params, cfg, num_steps=num_steps)

  return Loss(fn=fn, needs=frozenset({NEEDS_VALUES, NEEDS_START_LOGPROBS}),
              init_params=lambda: bvmpo_init_params(cfg),
              params_optimizer=optax.adam(cfg.multiplier_lr))
