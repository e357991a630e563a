"""Training the behaviour value network on a Grow dataset, and keeping it with the checkpoints.

The value network (``rest_jax.models.value.ValueModel``) regresses the Monte-Carlo return of
every target token of D_g (all records, before any threshold): ``discount**(T - t) * R`` for a
sequence of ``T + 1`` target tokens with terminal reward ``R``. It is trained once per Grow step,
before the Improve steps whose loss needs values, and saved at
``WORKDIR/checkpoints/value_g{g:03d}/params`` (orbax, like every checkpoint) with its loss curve in
``.../history.json``; a rerun restores it instead of training again.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax import storage
from rest_jax.checkpoints.phases import restore_pytree, save_pytree
from rest_jax.config import TrainConfig, ValueConfig
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.improve.losses import plain_loss, target_weights, token_mean
from rest_jax.models.base import ModelConfig
from rest_jax.models.value import ValueModel
from rest_jax.parallel import preemption
from rest_jax.parallel.layout import Layout


def mc_returns(reward: jax.Array, targets: jax.Array, discount: float) -> jax.Array:
  """Monte-Carlo returns of a terminal reward.

  Args:
    reward: float32 `[batch]`, the sequence reward R.
    targets: int32 `[batch, target_len]`, right-padded.
    discount: gamma in (0, 1].
  Returns:
    float32 `[batch, target_len]`: ``discount**(T - t) * R`` on target tokens (T the index of the
    last one), 0 on padding.
  """
  weights = target_weights(targets)
  last = weights.sum(-1, keepdims=True) - 1.0
  steps_left = jnp.maximum(last - jnp.arange(targets.shape[1], dtype=jnp.float32)[None], 0.0)
  return reward.astype(jnp.float32)[:, None] * discount ** steps_left * weights


def value_loss_fn(discount: float) -> Callable:
  """``(values, batch) -> (loss, metrics)``: token-mean squared error to ``mc_returns``."""

  def loss(values: jax.Array, batch: Mapping[str, jax.Array]):
    weights = target_weights(batch["targets"])
    returns = mc_returns(batch["reward"], batch["targets"], discount)
    mse = token_mean((values.astype(jnp.float32) - returns) ** 2, weights)
    return mse, {"loss": mse, "num_tokens": weights.sum()}

  return loss


class ValueNet:
  """The value network's definition on a Layout: graphdef, abstract params, initialisation."""

  def __init__(self, config: ModelConfig, layout: Layout, *, seed: int = 0):
    self.layout = layout
    self.seed = seed
    abstract = nnx.eval_shape(lambda: ValueModel(config, rngs=nnx.Rngs(seed)))
    self.graphdef, state = nnx.split(abstract)
    self.shardings = layout.state_shardings(state)
    self.abstract_params = layout.abstract_state(state)
    self._init = jax.jit(lambda: nnx.split(ValueModel(config, rngs=nnx.Rngs(seed)))[1],
                         out_shardings=self.shardings)

  def init(self, policy_params: nnx.State | None = None) -> nnx.State:
    """Fresh params; with ``policy_params`` the trunk starts from the policy's weights (every
    parameter of the same path and shape; the head and bias stay fresh)."""
    params = self._init()
    if policy_params is None:
      return params
    pure = nnx.to_pure_dict(params)
    pure["trunk"] = _overlay(pure["trunk"], nnx.to_pure_dict(policy_params))
    nnx.replace_by_pure_dict(params, pure)
    return jax.device_put(params, self.shardings)

  def apply(self, params: nnx.State, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Values `[batch, target_len]` (traceable)."""
    return nnx.merge(self.graphdef, params)(inputs, targets)


def _overlay(mine: Any, theirs: Any) -> Any:
  if isinstance(mine, dict):
    return {k: _overlay(v, theirs[k]) if isinstance(theirs, dict) and k in theirs else v
            for k, v in mine.items()}
  return theirs if getattr(theirs, "shape", None) == mine.shape else mine


def train_value(net: ValueNet, params: nnx.State, *, cfg: ValueConfig,
                batches: Iterator[Mapping[str, Any]],
                log_fn: Callable[[int, dict[str, float]], None] | None = None
                ) -> tuple[nnx.State, list[float]]:
  """``cfg.num_steps`` Adam steps of MC-return regression from ``params``.

  Args:
    net: the value network.
    params: starting params (``net.init(...)``).
    cfg: learning rate, steps, discount.
    batches: host batches with "inputs", "targets", "reward" (``data.train_batches``).
    log_fn: ``(step, {"value/loss": ...})`` sink.
  Returns:
    the trained params and the loss of every step.
  """
  train_cfg = TrainConfig(learning_rate=cfg.learning_rate, num_steps=cfg.num_steps,
                          batch_size=cfg.batch_size, eval_every=cfg.num_steps,
                          decay_to_zero=False)
  trainer = Trainer(net.graphdef, net.layout, plain_loss(value_loss_fn(cfg.discount)),
                    make_optimizer(train_cfg))
  state = trainer.init(params)
  pending = []
  for _ in range(cfg.num_steps):
    state, metrics = trainer.train_step(state, next(batches))
    pending.append(metrics["loss"])
    preemption.check("in value-network training (trained again on rerun)")
  history = [float(x) for x in jax.device_get(pending)]
  if log_fn is not None:
    for step, loss in enumerate(history, 1):
      log_fn(step, {"value/loss": loss})
  return state.params, history


def load_or_train_value(net: ValueNet, *, directory: str,
                        train: Callable[[], tuple[nnx.State, list[float]]]) -> nnx.State:
  """The value params saved in ``directory`` (``Workdir.value_dir``), or ``train()``'s (then
  saved there, with the loss history in history.json)."""
  path = storage.join(directory, "params")
  if storage.exists(path):
    return restore_pytree(path, net.abstract_params)
  params, history = train()
  storage.makedirs(directory)
  if jax.process_index() == 0:
    storage.write_json(storage.join(directory, "history.json"), {"loss": history})
  save_pytree(path, params)
  return params
