"""One training phase (BC, or one Improve step): eval gating, best-checkpoint keeping, early
stopping, resume from the latest checkpoint (with the data loader's position) and a stop at the
step every host agrees on after SIGTERM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rest_jax.checkpoints.phases import BEST_METRIC, PhaseCheckpoints
from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.trainer import Batch, Trainer, TrainState, make_schedule
from rest_jax.parallel import preemption


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

  def evaluate(self, *, step: int, state: TrainState,
               eval_fn: Callable[[nnx.State], Mapping[str, float]],
               log: Callable[[int, dict[str, float]], None], patience: int,
               checkpoints: PhaseCheckpoints, data: dict | None) -> dict[str, float]:
    """Evaluates ``state.params`` at ``step``: a history row, the log, then ``evaluated``."""
    metrics = _evaluate(eval_fn, state.params, step)
    self.history.append({"step": step, **metrics,
                         "train_loss": float(np.mean(self.window_losses))})
    self.window_losses = []
    log(step, {f"eval/{k}": v for k, v in metrics.items()})
    self.evaluated(step=step, state=state, metrics=metrics, patience=patience,
                   checkpoints=checkpoints, data=data)
    return metrics

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
  the same ``checkpoints`` resumes from the last saved step; a finished phase returns its result.

  Args:
    trainer: the Trainer (its optimizer built with ``make_optimizer(cfg, lr_scale=lr_scale)``).
    params: the starting params (``nnx.State``), on any sharding.
    cfg: the phase's TrainConfig.
    batches: ``start -> iterator`` of host batches from batch ``start`` (``Trainer.train_step``).
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
    for s, m in _check_finite(steps, cfg.learning_rate * lr_scale):
      record.window_losses.append(m["loss"])
      log(s, {**{f"train/{k}": v for k, v in m.items()},
              "train/learning_rate": float(schedule(s - 1))})
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  try:
    while step < cfg.num_steps and not record.stopped_early:
      batch = next(stream, None)
      if batch is None:
        raise RestJaxError(f"the batch stream ended at step {step} of {cfg.num_steps}; make "
                           "batches(start_step) repeat the data (or lower num_steps).")
      state, step_metrics = trainer.train_step(state, batch)
      step += 1
      pending.append((step, step_metrics))
      evaluate = step % cfg.eval_every == 0 or step == cfg.num_steps
      if len(pending) > 1 or evaluate:
        fetch(pending if evaluate else pending[:-1])
        pending = [] if evaluate else pending[-1:]
      data = data_state(next_batch + step - start) if data_state else None
      if evaluate:
        metrics = record.evaluate(step=step, state=state, eval_fn=eval_fn, log=log,
                                  patience=cfg.patience, checkpoints=checkpoints, data=data)
        bar.set_postfix(loss=record.history[-1]["train_loss"], eval_reward=metrics[BEST_METRIC])
      if preemption.reached():  # Every host stops after the same step (SIGTERM).
        if not evaluate:  # An evaluation saves the state; otherwise save it now.
          fetch(pending)
          checkpoints.save_latest(step, state, record.meta(data))
        raise preemption.stop(f"{checkpoints.directory.name} saved at step {step} of "
                              f"{cfg.num_steps}")
  finally:
    bar.close()
  del state
  return PhaseResult(checkpoints.restore_best_params(abstract.params),
                     checkpoints.best_metrics() or {}, step, record.stopped_early,
                     record.history)
