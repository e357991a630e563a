"""The trainer: TrainState, the train step jitted once with shardings and donation, and one
training phase (BC, or one Improve step) with eval gating and best-checkpoint keeping.

The model stays behind a functional boundary: ``nnx.split`` gives ``(graphdef, params)``; the
train step ``nnx.merge``s them inside traced code. Params are the model's ``nnx.State`` (of
``nnx.Param``), sharded by their logical axis names through the Layout; the Adam moments mirror
the params (same Variables, same metadata) and get the same shardings; scalars are replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from rest_jax.checkpoints.phases import BEST_METRIC, PhaseCheckpoints
from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.losses import Loss
from rest_jax.parallel import preemption
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


class Trainer:
  """Holds the model definition, the Layout, the loss and the optimizer; runs the train step.

  ``train_step`` is jitted once, with explicit in/out shardings (TrainState from the Layout,
  batch over ``("data", "fsdp")``, metrics replicated) and donation of the state.
  """

  def __init__(self, graphdef: nnx.GraphDef, layout: Layout, loss: Loss,
               optimizer: optax.GradientTransformation, *,
               extras: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None):
    """``loss``: a resolved ``Loss`` (``losses.make_loss(cfg)``, or ``losses.plain_loss(fn)``);
    ``extras``: the jitted pre-pass that adds what ``loss.needs`` to each (device) batch
    (``rest_jax.improve.extras``)."""
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
      logits = model(batch["inputs"], batch["targets"])
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
        `[batch, target_len]`, plus what the loss reads ("reward" `[batch]`, ...).
    Returns:
      the new state and the loss metrics (replicated scalars) plus "grad_norm".
    """
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


# -- One training phase ----------------------------------------------------------------------


@dataclasses.dataclass
class PhaseResult:
  """What a training phase returns: the best params (on the Layout) and its record."""

  best_params: nnx.State
  best_metrics: dict[str, float]
  steps_run: int  # Optimizer steps of the phase (including steps run before a resume).
  stopped_early: bool
  history: list[dict[str, float]]  # One row per evaluation: {"step", eval metrics, "train_loss"}.


def _check_finite(pending: list[tuple[int, dict]], peak_lr: float) -> list[tuple[int, dict]]:
  """Fetches the pending step metrics to the host; raises on a non-finite loss or gradient."""
  fetched = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]
  for step, metrics in fetched:
    for name in ("loss", "grad_norm"):
      if math.isfinite(metrics.get(name, 0.0)):
        continue
      raise RestJaxError(
          f"training diverged: the {name} is {metrics[name]} at step {step} of this phase "
          f"(peak learning rate {peak_lr:g}). Lower the learning rate (TrainConfig."
          "learning_rate, or ImproveConfig.lr_decay), or raise warmup_steps / lower grad_clip. "
          "Nothing was saved for this step; rerunning resumes from the last evaluation.")
  return fetched


def _evaluate(eval_fn: Callable[[nnx.State], Mapping[str, float]],
              params: nnx.State, step: int) -> dict[str, float]:
  metrics = {k: float(v) for k, v in dict(eval_fn(params)).items()}
  if BEST_METRIC not in metrics or not math.isfinite(metrics[BEST_METRIC]):
    raise RestJaxError(f"the eval function returned {metrics} at step {step}; it must return a "
                       f"finite {BEST_METRIC!r} (mean reward on D_eval).")
  return metrics


@dataclasses.dataclass
class _Record:
  """What a phase's evaluations have found so far (saved with every latest checkpoint)."""

  history: list[dict[str, float]]
  best: float
  bad_evals: int = 0
  stopped_early: bool = False
  # Train losses of the steps since the last evaluation (their mean goes into the next history
  # row); non-empty only in a checkpoint saved between evaluations (preemption).
  window_losses: list[float] = dataclasses.field(default_factory=list)

  def meta(self, data: dict | None = None) -> dict:
    """The checkpoint's JSON meta, with the loader state ``data`` when there is one."""
    return dict(history=self.history, best_reward=self.best, bad_evals=self.bad_evals,
                stopped_early=self.stopped_early, window_losses=self.window_losses,
                **({"data": data} if data else {}))

  def evaluated(self, *, step: int, state: TrainState, metrics: dict[str, float], patience: int,
                checkpoints: PhaseCheckpoints, data: dict | None = None) -> None:
    """Keeps the best params, counts evaluations without improvement, saves the latest state."""
    if metrics[BEST_METRIC] > self.best:
      self.best, self.bad_evals = metrics[BEST_METRIC], 0
      checkpoints.save_best(step, state.params, metrics)
    else:
      self.bad_evals += 1
    self.stopped_early = patience > 0 and self.bad_evals >= patience
    checkpoints.save_latest(step, state, self.meta(data))


def _start(trainer: Trainer, params: nnx.State, *,
           eval_fn: Callable[[nnx.State], Mapping[str, float]],
           checkpoints: PhaseCheckpoints, abstract: TrainState, num_steps: int,
           log: Callable[[int, dict[str, float]], None],
           data_state: Callable[[int], dict] | None = None
           ) -> tuple[int, TrainState | None, _Record, int]:
  """(step, state, record, next batch) to train from: the latest checkpoint's, or step 0
  evaluated and saved. ``state`` is None when the resumed phase has nothing left to do."""
  resumed = checkpoints.latest()
  if resumed is not None:
    step, meta = resumed
    checkpoints.discard_best_after(step)
    record = _Record(meta["history"], meta["best_reward"], meta["bad_evals"],
                     bool(meta["stopped_early"]), list(meta.get("window_losses", [])))
    if record.stopped_early or step >= num_steps:
      return step, None, record, step
    return step, checkpoints.restore_latest(abstract), record, _next_batch(
        meta, step, data_state, checkpoints)
  checkpoints.discard_best_after(-1)
  state = trainer.init(params)
  metrics = _evaluate(eval_fn, state.params, 0)
  record = _Record([{"step": 0, **metrics}], metrics[BEST_METRIC])
  log(0, {f"eval/{k}": v for k, v in metrics.items()})
  checkpoints.save_best(0, state.params, metrics)
  checkpoints.save_latest(0, state, record.meta(data_state(0) if data_state else None))
  return 0, state, record, 0


def _next_batch(meta: Mapping[str, Any], step: int, data_state: Callable[[int], dict] | None,
                checkpoints: PhaseCheckpoints) -> int:
  """The batch a resumed phase reads next: the checkpointed loader position (checked against
  the loader's data), or ``step`` for a loader without one."""
  saved = meta.get("data")
  if data_state is None or saved is None:
    return step
  now = data_state(int(saved["next_batch"]))
  if now != saved:
    raise RestJaxError(
        f"the training data of {checkpoints.directory} changed since its last checkpoint (loader "
        f"state {saved}, now {now}): its Grow data or selection was rebuilt. Delete "
        f"{checkpoints.directory} and rerun to train the phase again on the current data.")
  return int(saved["next_batch"])


def train_phase(*, trainer: Trainer, params: nnx.State, cfg: TrainConfig,
                batches: Callable[[int], Iterator[Batch]],
                eval_fn: Callable[[nnx.State], Mapping[str, float]],
                checkpoints: PhaseCheckpoints, lr_scale: float = 1.0, progress: bool = False,
                log_fn: Callable[[int, dict[str, float]], None] | None = None,
                data_state: Callable[[int], dict] | None = None) -> PhaseResult:
  """Trains from ``params`` for up to ``cfg.num_steps`` steps; returns the best-evaluating params.

  Evaluates at step 0 (the starting policy is a candidate, so a phase never ends worse than it
  started on D_eval), every ``cfg.eval_every`` steps and at the end. Keeps the best params by
  ``eval_reward`` and saves the TrainState + record at every evaluation; stops early after
  ``cfg.patience`` evaluations without improvement (when > 0). After SIGTERM it saves the
  TrainState at the step all hosts agree on and raises ``preemption.Preempted``. Rerunning with
  the same ``checkpoints`` resumes from the last saved step (``batches(step)`` must give the
  batch stream from ``step``); a finished phase returns its result without training.

  Args:
    trainer: the Trainer (its optimizer built with ``make_optimizer(cfg, lr_scale=lr_scale)``).
    params: the starting params (``nnx.State``), on any sharding.
    cfg: the phase's TrainConfig.
    batches: ``start_step -> iterator`` of host batches (see ``Trainer.train_step``).
    eval_fn: params -> metrics with ``"eval_reward"`` (and e.g. an independent metric).
    checkpoints: this phase's directory.
    lr_scale: the learning-rate multiplier the optimizer uses (for logging).
    progress: show a tqdm bar (process 0 only).
    log_fn: ``(step, metrics)`` sink, e.g. TensorBoard; "train/*" every step, "eval/*" at evals.
    data_state: ``next batch -> loader state`` (JSON): saved with every latest checkpoint; a
      resumed phase checks it against the loader's and calls ``batches`` at its next batch.
  Returns:
    the PhaseResult; ``best_params`` are restored from the best checkpoint, on the Layout.
  """
  log = log_fn or (lambda step, metrics: None)
  schedule = make_schedule(cfg, lr_scale=lr_scale)
  peak_lr = cfg.learning_rate * lr_scale
  abstract = trainer.abstract_state(params)
  step, state, record, next_batch = _start(
      trainer, params, eval_fn=eval_fn, checkpoints=checkpoints, abstract=abstract,
      num_steps=cfg.num_steps, log=log, data_state=data_state)
  start = step  # Batch next_batch + (s - start) feeds optimizer step s + 1.
  bar = tqdm(total=cfg.num_steps, initial=step, desc="train", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  stream = batches(next_batch) if state is not None else iter(())
  pending: list[tuple[int, dict]] = []  # Step metrics not fetched yet (one step of lag).

  def fetch(steps: list[tuple[int, dict]]) -> None:
    for s, m in _check_finite(steps, peak_lr):
      record.window_losses.append(m["loss"])
      log(s, {**{f"train/{k}": v for k, v in m.items()},
              "train/learning_rate": float(schedule(s - 1))})
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  try:
    while step < cfg.num_steps and not record.stopped_early:
      try:
        batch = next(stream)
      except StopIteration:
        raise RestJaxError(f"the batch stream ended at step {step} of {cfg.num_steps}; make "
                           "batches(start_step) repeat the data (or lower num_steps).") from None
      state, step_metrics = trainer.train_step(state, batch)
      step += 1
      pending.append((step, step_metrics))
      evaluate = step % cfg.eval_every == 0 or step == cfg.num_steps
      if len(pending) > 1 or evaluate:
        fetch(pending if evaluate else pending[:-1])
        pending = [] if evaluate else pending[-1:]
      data = data_state(next_batch + step - start) if data_state else None
      if evaluate:
        metrics = _evaluate(eval_fn, state.params, step)
        record.history.append({"step": step, **metrics,
                               "train_loss": float(np.mean(record.window_losses))})
        record.window_losses = []
        log(step, {f"eval/{k}": v for k, v in metrics.items()})
        record.evaluated(step=step, state=state, metrics=metrics, patience=cfg.patience,
                         checkpoints=checkpoints, data=data)
        bar.set_postfix(loss=record.history[-1]["train_loss"], eval_reward=metrics[BEST_METRIC])
      if preemption.reached():  # Every host stops after the same step (SIGTERM).
        if not evaluate:  # An evaluation saves the state; otherwise save it now.
          fetch(pending)
          pending = []
          checkpoints.save_latest(step, state, record.meta(data))
        raise preemption.stop(f"{checkpoints.directory.name} saved at step {step} of "
                              f"{cfg.num_steps}")
  finally:
    bar.close()
  del state
  return PhaseResult(checkpoints.restore_best_params(abstract.params),
                     checkpoints.best_metrics() or {}, step, record.stopped_early,
                     record.history)
