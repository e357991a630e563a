"""Improve-step losses, selected by name (``TrainConfig.loss``).

| name                 | what                                                       | needs        |
|----------------------|------------------------------------------------------------|--------------|
| "bc"                 | token NLL (the paper's best)                               | -            |
| "reward_weighted_bc" | -R * token NLL (ReST-EM's M-step)                          | -            |
| "gold"               | GOLD: importance-weighted PG, returns from the frozen BC   | bc_logprobs  |
| "bvmpo"              | behaviour V-MPO with learned eta / alpha, annealed KL(b||pi)| values, start|
| "oac"                | offline actor-critic, A = return - V                       | values       |
| "raft_pp"            | RAFT++: clipped importance-weighted BC, pi / pi_behaviour  | -            |

The registry holds one kind of entry, a ``LossBuilder`` (``TrainConfig -> Loss``): a plain
``(logits, batch) -> (loss, metrics)`` function is wrapped once, at registration
(``register_loss(name, fn)``); a configurable loss registers its builder, which reads the
phase's TrainConfig (``TrainConfig.gold`` / ``.bvmpo`` / ``.oac`` / ``.raft_pp``, num_steps)
(``register_loss_builder``). ``make_loss(cfg)`` is the one way to get the ``Loss`` the Trainer
runs; ``check_loss_name(name)`` checks a name before a run. See
``rest_jax.improve.losses.base`` for the batch contract and the needs.
"""

from __future__ import annotations

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
from rest_jax.improve.losses.raft_pp import make_raft_pp, raft_pp_loss, raft_pp_weights

__all__ = [
    "KNOWN_NEEDS", "LOSSES", "NEEDS_BC_LOGPROBS", "NEEDS_START_LOGPROBS", "NEEDS_VALUES", "Batch",
    "Loss", "LossBuilder", "LossFn", "LossParams", "Metrics", "bc_loss", "bvmpo_loss",
    "check_loss_name", "gold_loss", "gold_returns", "make_loss", "oac_loss", "plain_loss",
    "raft_pp_loss", "raft_pp_weights", "register_loss", "register_loss_builder",
    "reward_weighted_bc_loss", "target_weights",
    "token_logprobs", "token_mean", "token_metrics",
]

LossBuilder = Callable[[TrainConfig], Loss]


def _constant(loss: Loss) -> LossBuilder:
  """The builder of a loss without hyperparameters: the same ``Loss`` for every config."""
  return lambda cfg: loss


LOSSES: dict[str, LossBuilder] = {
    "bc": _constant(plain_loss(bc_loss)),
    "reward_weighted_bc": _constant(plain_loss(reward_weighted_bc_loss)),
    "gold": lambda cfg: make_gold(cfg.gold),
    "bvmpo": lambda cfg: make_bvmpo(cfg.bvmpo, num_steps=cfg.num_steps),
    "oac": lambda cfg: make_oac(cfg.oac),
}


def register_loss_builder(name: str, build: LossBuilder) -> None:
  """Adds a configurable loss, ``build(cfg) -> Loss``, under ``name`` (a taken name is an
  error)."""
  if name in LOSSES:
    raise RestJaxError(f"a loss named {name!r} is already registered; pick another name.")
  LOSSES[name] = build


def register_loss(name: str, fn: LossFn) -> None:
  """Adds a plain ``(logits, batch) -> (loss, metrics)`` loss under ``name``, wrapped once as a
  ``Loss`` without needs or parameters (a taken name is an error)."""
  register_loss_builder(name, _constant(plain_loss(fn)))


def check_loss_name(name: str) -> None:
  """Raises RestJaxError (listing the known losses) when no loss is registered as ``name``."""
  if name not in LOSSES:
    raise RestJaxError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}. "
                       "Set TrainConfig.loss to one of them (or register a new one with "
                       "rest_jax.improve.losses.register_loss).")


def make_loss(cfg: TrainConfig) -> Loss:
  """The ``Loss`` of ``cfg.loss`` with the hyperparameters of ``cfg``.

  Raises:
    RestJaxError: an unknown loss name (the message lists the known ones).
  """
  check_loss_name(cfg.loss)
  return LOSSES[cfg.loss](cfg)


register_loss_builder("raft_pp", lambda cfg: make_raft_pp(cfg.raft_pp))
