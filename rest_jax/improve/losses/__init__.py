"""Improve-step losses, selected by name (``TrainConfig.loss``).

| name                 | what                                                       | needs        |
|----------------------|------------------------------------------------------------|--------------|
| "bc"                 | token NLL (the paper's best)                               | -            |
| "reward_weighted_bc" | -R * token NLL (ReST-EM's M-step)                          | -            |
| "gold"               | GOLD: importance-weighted PG, returns from the frozen BC   | bc_logprobs  |
| "bvmpo"              | behaviour V-MPO with learned eta / alpha, annealed KL(b||pi)| values, start|
| "oac"                | offline actor-critic, A = return - V                       | values       |

A plain loss is a pure ``(logits, batch) -> (loss, metrics)`` function (``register_loss(name,
fn)``); a configurable one is a ``LossFactory`` building a ``Loss`` from the phase's TrainConfig
(its hyperparameters: ``TrainConfig.gold`` / ``.bvmpo`` / ``.oac``). ``make_loss(cfg)`` gives the
``Loss`` the Trainer runs. See ``rest_jax.improve.losses.base`` for the batch contract and the needs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.losses.actor_critic import bvmpo_loss, make_bvmpo, make_oac, oac_loss
from rest_jax.improve.losses.base import (KNOWN_NEEDS, NEEDS_BC_LOGPROBS, NEEDS_START_LOGPROBS,
                                  NEEDS_VALUES, Batch, Loss, LossFn, LossParams, Metrics,
                                  plain_loss, target_weights, token_logprobs, token_mean,
                                  token_metrics)
from rest_jax.improve.losses.bc import bc_loss, reward_weighted_bc_loss
from rest_jax.improve.losses.gold import gold_loss, gold_returns, make_gold

__all__ = [
    "KNOWN_NEEDS", "LOSSES", "NEEDS_BC_LOGPROBS", "NEEDS_START_LOGPROBS", "NEEDS_VALUES", "Batch",
    "Loss", "LossFactory", "LossFn", "LossParams", "Metrics", "bc_loss", "bvmpo_loss",
    "get_loss", "gold_loss", "gold_returns", "make_loss", "oac_loss", "plain_loss",
    "register_loss", "reward_weighted_bc_loss", "target_weights", "token_logprobs",
    "token_mean", "token_metrics",
]


@dataclasses.dataclass(frozen=True)
class LossFactory:
  """Builds a ``Loss`` from the TrainConfig of the phase (hyperparameters, num_steps)."""

  build: Callable[[TrainConfig], Loss]

  def __call__(self, cfg: TrainConfig) -> Loss:
    return self.build(cfg)


LOSSES: dict[str, LossFn | LossFactory] = {
    "bc": bc_loss,
    "reward_weighted_bc": reward_weighted_bc_loss,
    "gold": LossFactory(lambda cfg: make_gold(cfg.gold)),
    "bvmpo": LossFactory(lambda cfg: make_bvmpo(cfg.bvmpo, num_steps=cfg.num_steps)),
    "oac": LossFactory(lambda cfg: make_oac(cfg.oac)),
}


def register_loss(name: str, fn: LossFn | LossFactory) -> None:
  """Adds a loss to the registry under ``name`` (an existing name is an error)."""
  if name in LOSSES and LOSSES[name] is not fn:
    raise RestJaxError(f"a loss named {name!r} is already registered; pick another name.")
  LOSSES[name] = fn


def get_loss(name: str) -> LossFn | LossFactory:
  """The loss registered under ``name``: a plain function or a ``LossFactory``."""
  if name not in LOSSES:
    raise RestJaxError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}. "
                       "Set TrainConfig.loss to one of them (or register a new one with "
                       "rest_jax.improve.losses.register_loss).")
  return LOSSES[name]


def make_loss(cfg: TrainConfig) -> Loss:
  """The ``Loss`` of ``cfg.loss`` with the hyperparameters of ``cfg``."""
  entry = get_loss(cfg.loss)
  return entry(cfg) if isinstance(entry, LossFactory) else plain_loss(entry)
