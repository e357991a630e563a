"""The trainer: TrainState, the optimizer and the train step jitted once with shardings and
donation (one training phase around it: ``rest_jax.improve.phase``).

The model stays behind a functional boundary: ``nnx.split`` gives ``(graphdef, params)``; the
train step ``nnx.merge``s them inside traced code. Params are the model's ``nnx.State`` (of
``nnx.Param``), sharded by their logical axis names through the Layout; the Adam moments mirror
the params (same Variables, same metadata) and get the same shardings; scalars are replicated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.losses import Loss
from rest_jax.improve.packing import pack_batch, teacher_forced
from rest_jax.parallel.layout import Layout

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything one optimisation phase carries from step to step (a pytree)."""

  params: nnx.State  # nnx.State of nnx.Param: the model's weights.
  opt_state: optax.OptState
  step: jax.Array  # int32 scalar: optimizer steps taken in this phase.
  # The loss's own learnable scalars (e.g. BVMPO's Lagrange multipliers) and their optimizer
  # state; empty for losses without parameters.
  loss_params: Any = flax.struct.field(default_factory=dict)
  loss_opt_state: Any = flax.struct.field(default_factory=tuple)


def make_schedule(cfg: TrainConfig, *, lr_scale: float = 1.0) -> optax.Schedule:
  """Linear warmup from 0 to ``cfg.learning_rate * lr_scale`` over ``cfg.warmup_steps``, then
  linear decay to 0 at ``cfg.num_steps`` when ``cfg.decay_to_zero`` (else constant)."""
  peak = cfg.learning_rate * lr_scale
  after = (optax.linear_schedule(peak, 0.0, cfg.num_steps - cfg.warmup_steps)
           if cfg.decay_to_zero else optax.constant_schedule(peak))
  if cfg.warmup_steps == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, cfg.warmup_steps), after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, *, lr_scale: float = 1.0) -> optax.GradientTransformation:
  """AdamW on ``make_schedule``, after global-norm clipping to ``cfg.grad_clip`` (0 = off).

  Weight decay ``cfg.weight_decay`` applies to matrices only (not to norm scales or biases).
  The moments have the params' dtype unless ``cfg.moment_dtype`` names one.
  """
  if not (lr_scale > 0 and math.isfinite(lr_scale)):
    raise RestJaxError(f"lr_scale must be a positive number, got {lr_scale}.")
  adamw = optax.adamw(make_schedule(cfg, lr_scale=lr_scale), weight_decay=cfg.weight_decay,
                      mask=lambda params: jax.tree.map(lambda x: x.ndim > 1, params))
  if cfg.moment_dtype:
    adamw = with_moment_dtype(adamw, jnp.dtype(cfg.moment_dtype))
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


def with_moment_dtype(inner: optax.GradientTransformation,
                      dtype: Any) -> optax.GradientTransformation:
  """``inner`` run in ``dtype`` (its moments stored so), whatever the params' dtype.

  Gradients and params are cast to ``dtype`` going in, updates back to the gradients' dtype
  coming out: bfloat16 weights with float32 Adam moments.
  """
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    return inner.init(cast(params))

  def update(updates, state, params=None):
    out, state = inner.update(cast(updates), state, None if params is None else cast(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

  return optax.GradientTransformation(init, update)


def packing_groups(layout: Layout) -> int:
  """The packing groups of a batch on ``layout``: its batch shards, whole shards per host.

  Raises:
    RestJaxError: the batch shards do not split evenly over the hosts.
  """
  groups = layout.num_batch_shards
  if groups % jax.process_count():
    raise RestJaxError(f"packing needs the {groups} batch shards (mesh data x fsdp) to split "
                       f"evenly over the {jax.process_count()} hosts; change the mesh or set "
                       "TrainConfig.packing = False.")
  return groups


class Trainer:
  """Holds the model definition, the Layout, the loss and the optimizer; runs the train step.

  ``train_step`` is jitted once, with explicit in/out shardings (TrainState from the Layout,
  batch over ``("data", "fsdp")``, metrics replicated) and donation of the state.
  """

  def __init__(self, graphdef: nnx.GraphDef, layout: Layout, loss: Loss,
               optimizer: optax.GradientTransformation, *,
               extras: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
               packing: bool = False, packing_scale: int = 1):
    """``loss``: a resolved ``Loss`` (``losses.make_loss(cfg)``, or ``losses.plain_loss(fn)``);
    ``extras``: the jitted pre-pass that adds what ``loss.needs`` to each (device) batch
    (``rest_jax.improve.extras``); ``packing``: run the model on packed rows
    ``packing_scale`` times as long as the batch's (``rest_jax.improve.packing``; the loss
    sees the same per-example arrays)."""
    if not isinstance(loss, Loss):
      raise TypeError(f"Trainer needs a Loss, got {type(loss).__name__}; resolve it with "
                      "rest_jax.improve.losses.make_loss(cfg) (or plain_loss(fn)).")
    self.graphdef = graphdef
    self.layout = layout
    self.loss = loss
    self.optimizer = optimizer
    self.extras = extras
    if self.loss.needs and extras is None:
      raise RestJaxError(f"this loss needs {sorted(self.loss.needs)} in every batch; build the "
                         "Trainer with extras=rest_jax.improve.extras.build_extras(...).")
    self.batch_sharding = layout.sharding(("batch",))
    self.packing, self.packing_scale = packing, packing_scale
    self.pack_groups = packing_groups(layout) if packing else layout.num_batch_shards
    self._abstract: TrainState | None = None
    self._init_fn: Callable | None = None
    self._step_fn: Callable | None = None

  # -- Shardings and placement -----------------------------------------------------------------

  def abstract_state(self, params: nnx.State) -> TrainState:
    """The TrainState as ``jax.ShapeDtypeStruct``s with shardings (from concrete or abstract
    params; computed once). Leaves of ``.params`` are the restore target of the params."""
    if self._abstract is None:
      variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
      others = sorted({type(v).__name__ for v in variables if not isinstance(v, nnx.Param)})
      if others:
        raise RestJaxError(f"the model state holds {others} besides nnx.Param; split the model "
                           "so that the trained state is parameters only.")
      shapes = jax.eval_shape(lambda p: self._fresh_state(p), params)
      replicate = lambda tree: jax.tree.map(lambda _: self.layout.replicated(), tree)
      shardings = TrainState(
          params=self.layout.state_shardings(shapes.params),
          opt_state=self._opt_state_shardings(shapes.opt_state),
          step=self.layout.replicated(), loss_params=replicate(shapes.loss_params),
          loss_opt_state=replicate(shapes.loss_opt_state))
      self._abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    elif jax.tree.structure(params) != jax.tree.structure(self._abstract.params):
      raise RestJaxError("these params do not match the model this Trainer was built for; "
                         "build one Trainer per model (nnx.split of the same module).")
    return self._abstract

  def abstract_params(self, params: nnx.State) -> nnx.State:
    """``abstract_state(params).params``: the params' shapes with their training shardings."""
    return self.abstract_state(params).params

  def state_shardings(self, params: nnx.State) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, self.abstract_state(params))

  def _opt_state_shardings(self, opt_state: Any) -> Any:
    """Moments (Variables that mirror params) shard like their params; the rest is replicated."""

    def one(x):
      if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding")
        shape = x.get_value().shape
        if names is not None and len(names) == len(shape):
          return x.replace(self.layout.sharding(names, shape))
        return x.replace(self.layout.replicated())
      return self.layout.replicated()

    return jax.tree.map(one, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def _fresh_state(self, params: nnx.State) -> TrainState:
    """Step 0: optimizer and loss parameters initialised (``params`` used as they are)."""
    loss_params, loss_opt_state = {}, ()
    if self.loss.init_params is not None:
      loss_params = self.loss.init_params()
      loss_opt_state = self.loss.params_optimizer.init(loss_params)
    return TrainState(params, self.optimizer.init(params), jnp.int32(0), loss_params,
                      loss_opt_state)

  def init(self, params: nnx.State) -> TrainState:
    """A fresh TrainState (step 0) on the Layout; ``params`` is copied, never donated later."""
    shardings = self.state_shardings(params)
    if self._init_fn is None:
      self._init_fn = jax.jit(
          lambda p: self._fresh_state(jax.tree.map(jnp.copy, p)),
          in_shardings=(shardings.params,), out_shardings=shardings)
    return self._init_fn(jax.device_put(params, shardings.params))

  def device_batch(self, batch: Batch) -> dict[str, jax.Array]:
    """This host's numpy batch ``{key: [host_batch, ...]}`` as global arrays sharded over the
    batch axes (``[host_batch * process_count, ...]``). Non-numeric entries (e.g. strings) are
    dropped; ``jax.Array`` entries are passed through."""
    out = {}
    for key, value in batch.items():
      if isinstance(value, jax.Array):
        out[key] = value
        continue
      value = np.asarray(value)
      if value.dtype.kind not in "biuf":
        continue
      global_size = value.shape[0] * jax.process_count()
      if global_size % self.layout.num_batch_shards:
        raise RestJaxError(
            f"global batch size {global_size} ({key!r}) is not divisible by the "
            f"{self.layout.num_batch_shards} batch shards (mesh data x fsdp); choose a "
            f"batch_size that is a multiple of {self.layout.num_batch_shards}.")
      out[key] = jax.make_array_from_process_local_data(self.batch_sharding, value)
    return out

  # -- The train step --------------------------------------------------------------------------

  def _step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:

    batch = dict(batch, step=state.step)

    def loss_of(params, loss_params):
      model = nnx.merge(self.graphdef, params)
      logits = teacher_forced(model, batch, groups=self.pack_groups)
      return self.loss.fn(logits, batch, loss_params)

    (_, metrics), (grads, loss_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
        state.params, state.loss_params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss_params, loss_opt_state = state.loss_params, state.loss_opt_state
    if self.loss.params_optimizer is not None:
      loss_updates, loss_opt_state = self.loss.params_optimizer.update(
          loss_grads, loss_opt_state, loss_params)
      loss_params = optax.apply_updates(loss_params, loss_updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(params, opt_state, state.step + 1, loss_params, loss_opt_state), metrics

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. ``state`` is donated: do not use it afterwards.

    Args:
      state: the TrainState from ``init`` / a previous step / a restore.
      batch: this host's batch: "inputs" int32 `[batch, input_len]`, "targets" int32
        `[batch, target_len]`, plus what the loss reads ("reward" `[batch]`, ...); packed
        here when the Trainer was built with ``packing``.
    Returns:
      the new state and the loss metrics (replicated scalars) plus "grad_norm".
    """
    if self.packing:
      batch = pack_batch(batch, groups=self.pack_groups // jax.process_count(),
                         scale=self.packing_scale)
    batch = self.device_batch(batch)
    if self.extras is not None:
      batch = {**batch, **jax.device_put(self.extras(batch), self.batch_sharding)}
    return self.jitted_step(state.params)(state, batch)

  def jitted_step(self, params: nnx.State) -> Callable:
    """The jitted, donating ``(state, device batch) -> (state, metrics)`` (built once); also
    what ``rest_jax.parallel.compile_check`` lowers with ``abstract_state(params)``."""
    if self._step_fn is None:
      shardings = self.state_shardings(params)
      self._step_fn = jax.jit(
          self._step, in_shardings=(shardings, self.batch_sharding),
          out_shardings=(shardings, self.layout.replicated()), donate_argnums=(0,))
    return self._step_fn
