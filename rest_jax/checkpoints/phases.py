"""Orbax checkpoints: sharded pytrees, params-only restore, and one training phase's directory.

On disk every ``nnx.State`` is stored as its pure dict (``nnx.to_pure_dict``), so a parameter is
named by its module path (``params/decoder/layers/0/mlp/wi/kernel``) and not by NNX internals.
Restores take an abstract tree whose leaves are ``jax.ShapeDtypeStruct`` with ``.sharding`` set;
each array is read straight onto its sharding (no host copy of the whole model). All processes
call every function here (orbax coordinates multi-host writes). Writes are atomic: orbax writes
``<step>.orbax-checkpoint-tmp-<t>`` and renames it when complete, so a crashed write leaves the
older complete checkpoint readable. A full disk or quota during a save is one RestJaxError naming
the checkpoint (free space and rerun: the phase resumes from its last complete checkpoint).

A phase directory (``PhaseCheckpoints``) holds::

  latest/<step>/{state,meta}   the newest TrainState + JSON meta, for resume (only one kept)
  best/<step>/{params,metrics} the best-evaluating params by metrics["eval_reward"]

``save_latest`` is the commit point of the phase: it prunes ``best/`` to its single best
checkpoint. Between a ``save_best`` and the next ``save_latest`` the previous best is kept too,
so a run that crashes in between resumes from ``latest`` with ``discard_best_after(step)`` and
finds the best checkpoint that ``latest``'s meta refers to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from rest_jax import buckets
from rest_jax import storage
from rest_jax import storage_errors
from rest_jax.errors import RestJaxError
from rest_jax.parallel import distributed

PathLike = str | os.PathLike
BEST_METRIC = "eval_reward"


def _is_state(x: Any) -> bool:
  return isinstance(x, nnx.State)


def to_pure(tree: Any) -> Any:
  """Replaces every ``nnx.State`` in ``tree`` by its pure dict (other nodes are kept)."""
  return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree,
                      is_leaf=_is_state)


def _rebuild_state(template: nnx.State, pure: Mapping[str, Any]) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)  # A fresh State with fresh Variables.
  nnx.replace_by_pure_dict(state, pure)
  return state


def from_pure(template: Any, pure: Any) -> Any:
  """Inverse of ``to_pure``: puts the arrays of ``pure`` into the structure of ``template``."""
  return jax.tree.map(lambda t, p: _rebuild_state(t, p) if _is_state(t) else p, template, pure,
                      is_leaf=_is_state)


def _check_abstract(abstract_tree: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
      raise RestJaxError(
          f"restore target leaf {jax.tree_util.keystr(path)} is {type(leaf).__name__}, not a "
          "jax.ShapeDtypeStruct with .sharding; build the target with "
          "Trainer.abstract_state / abstract_params (shardings from the Layout).")


def _require_dir(path: epath.Path, what: str) -> None:
  if not path.exists():
    raise RestJaxError(f"no {what} at {path}; check the path (a checkpoint directory written by "
                       "rest_jax.checkpoints.phases) or rerun the phase that writes it.")


@contextlib.contextmanager
def _saving(path: str) -> Iterator[None]:
  """Around an orbax save to ``path``: on ``gs://`` the bucket is checked first (orbax waits on
  a deleted bucket for minutes), then storage failures become one RestJaxError
  (``storage.user_errors``)."""
  buckets.check_workdir(path)
  with storage.user_errors(path, writing=True):
    yield


@contextlib.contextmanager
def _reading(what: str, fix: str, path: str) -> Iterator[None]:
  """Turns a failure to read checkpoint data into one RestJaxError naming ``what`` and ``fix``.

  orbax and TensorStore raise ValueError, OSError, JSONDecodeError or a plain Exception for a
  truncated or damaged checkpoint, so any exception but a RestJaxError is reported (its type
  and first line are kept, so a bug still shows). Flipped bytes that keep the sizes are not
  detected: orbax stores no checksums. A storage failure (access denied, bucket gone, network
  down: ``storage_errors.classify``) is reported as such, not as a damaged checkpoint.
  """
  try:
    yield
  except RestJaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    cause = storage_errors.classify(e, remote=not storage.is_local(path))
    if cause is not None:
      raise storage_errors.storage_error(path, cause, e) from None
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise RestJaxError(f"{what} is corrupt or truncated ({type(e).__name__}: {detail}). "
                       f"{fix}") from None


def _reading_file(path: epath.Path) -> contextlib.AbstractContextManager:
  return _reading(f"checkpoint {path}", "Restore it from a copy, or write it again (rerun what "
                  "wrote it: rest-jax import, train-reward, or the phase).", str(path))


def save_pytree(path: PathLike, tree: Any) -> None:
  """Writes ``tree`` (jax.Arrays, ``nnx.State``s, optax states, ...) as one checkpoint.

  The directory ``path`` must not exist yet; it appears only once the write is complete.
  """
  path = epath.Path(storage.absolute(os.fspath(path)))
  if path.exists():
    raise RestJaxError(f"checkpoint path {path} already exists; choose a new path or delete it.")
  with _saving(str(path)), ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, to_pure(tree))
    checkpointer.wait_until_finished()


def restore_pytree(path: PathLike, abstract_tree: Any) -> Any:
  """Reads a ``save_pytree`` checkpoint onto the shardings of ``abstract_tree``.

  Args:
    path: the checkpoint directory.
    abstract_tree: the tree to restore, leaves ``jax.ShapeDtypeStruct`` with ``.sharding``.
  Returns:
    a tree like ``abstract_tree`` holding ``jax.Array``s placed on those shardings.
  """
  path = epath.Path(storage.absolute(os.fspath(path)))
  _require_dir(path, "checkpoint")
  _check_abstract(abstract_tree)
  with ocp.StandardCheckpointer() as checkpointer, _reading_file(path):
    pure = checkpointer.restore(path, to_pure(abstract_tree))
  return from_pure(abstract_tree, pure)


def restore_params(path: PathLike, abstract_params: Any) -> Any:
  """Reads only the params of a checkpoint (a full TrainState or a params-only tree).

  A checkpoint whose top level has a ``params`` entry (a TrainState) is restored partially: the
  optimizer state is not read. Otherwise the whole checkpoint is the params.

  Args:
    path: the checkpoint directory (e.g. ``<phase>/latest/<step>/state``).
    abstract_params: ``nnx.State`` (or tree) of ``jax.ShapeDtypeStruct`` with ``.sharding``.
  Returns:
    the params, like ``abstract_params``, placed on its shardings.
  """
  path = epath.Path(storage.absolute(os.fspath(path)))
  _require_dir(path, "checkpoint")
  _check_abstract(abstract_params)
  pure_params = to_pure(abstract_params)
  with ocp.PyTreeCheckpointer() as checkpointer, _reading_file(path):
    stored = checkpointer.metadata(path).item_metadata.tree
    if isinstance(stored, Mapping) and "params" in stored:
      item = {"params": pure_params}
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))["params"]
    else:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=pure_params,
          restore_args=ocp.checkpoint_utils.construct_restore_args(pure_params)))
  return from_pure(abstract_params, restored)


def _jsonable(obj: Any) -> Any:
  """A JSON-compatible copy (numpy / jax scalars become Python numbers)."""
  return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _best_score(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class _Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager, except that it never asks jax for the preemption sync point.

  jax keeps one preemption counter per process (``reached_preemption_sync_point``: the last
  value passed in is what a SIGTERM's agreement compares). ``rest_jax.parallel.preemption``
  passes its count of check points; orbax's ``save`` would pass this phase's checkpoint steps
  in between and move the agreed point where the run never checks (then a SIGTERM during
  Improve was never acted on). Preemption is handled by ``rest_jax.parallel.preemption``.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class PhaseCheckpoints:
  """The checkpoints of one training phase (BC or one Improve step) under ``directory``.

  ``save_latest`` keeps the newest TrainState (for resume), ``save_best`` the params with the
  highest ``metrics["eval_reward"]``. Use as a context manager, or call ``close``.
  """

  def __init__(self, directory: PathLike):
    self.directory = epath.Path(storage.absolute(os.fspath(directory)))  # orbax: absolute.
    common = dict(max_to_keep=1, create=True, enable_async_checkpointing=False,
                  cleanup_tmp_directories=True)
    with storage.user_errors(str(self.directory), writing=True):
      self._latest = _Manager(
          self.directory / "latest", options=ocp.CheckpointManagerOptions(**common))
      self._best = _Manager(
          self.directory / "best", options=ocp.CheckpointManagerOptions(
              best_fn=_best_score, best_mode="max", **{**common, "max_to_keep": 2}))

  def _reading(self, which: str) -> contextlib.AbstractContextManager:
    phase = self.directory.name
    return _reading(
        f"the {which} checkpoint of phase {phase!r} in {self.directory}",
        f"Delete {self.directory} (and the phase's marker phases/{phase}.json, if present) and "
        "rerun: the phase is trained again from the checkpoint of the phase before it.",
        str(self.directory))

  def __enter__(self) -> PhaseCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  def latest_state_path(self) -> epath.Path | None:
    """The directory of the newest TrainState (for ``restore_params``), or None."""
    step = self._latest.latest_step()
    return None if step is None else self._latest.directory / str(step) / "state"

  def save_latest(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves the TrainState and JSON ``meta`` at ``step``; older ones are deleted afterwards.

    Then prunes ``best/`` to its single best checkpoint.
    """
    with _saving(str(self.directory / "latest" / str(step))):
      if step in self._latest.all_steps():
        self._latest.delete(step)
      self._latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(to_pure(state)), meta=ocp.args.JsonSave(_jsonable(meta))))
      self._latest.wait_until_finished()
    # Every host reads best/ before any host prunes it (a host listing best/ while another
    # deletes a step there fails on the vanished step), and all wait for the pruning to end.
    best = self.best_step()
    distributed.barrier(f"{self.directory} best read at step {step}")
    for s in self._best.all_steps():
      if s != best:
        self._best.delete(s)
    distributed.barrier(f"{self.directory} best pruned at step {step}")

  def latest(self) -> tuple[int, dict[str, Any]] | None:
    """``(step, meta)`` of the newest complete TrainState checkpoint, or None."""
    self._latest.reload()
    step = self._latest.latest_step()
    if step is None:
      return None
    with self._reading("latest"):
      restored = self._latest.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
      return step, dict(restored["meta"])

  def restore_latest(self, abstract_state: Any) -> Any:
    """The newest TrainState, placed on the shardings of ``abstract_state``."""
    step = self._latest.latest_step()
    if step is None:
      raise RestJaxError(f"no complete checkpoint in {self.directory / 'latest'} to resume from.")
    _check_abstract(abstract_state)
    with self._reading("latest"):
      restored = self._latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(to_pure(abstract_state))))
    return from_pure(abstract_state, restored["state"])

  def save_best(self, step: int, params: Any, metrics: Mapping[str, float]) -> None:
    """Saves ``params`` with its eval ``metrics``; only the best by ``eval_reward`` is kept."""
    if BEST_METRIC not in metrics or not math.isfinite(float(metrics[BEST_METRIC])):
      raise RestJaxError(f"eval metrics {dict(metrics)} need a finite {BEST_METRIC!r}; make the "
                         f"eval function return {{{BEST_METRIC!r}: <mean reward on D_eval>, ...}}.")
    metrics = _jsonable(dict(metrics))
    with _saving(str(self.directory / "best" / str(step))):
      if step in self._best.all_steps():
        self._best.delete(step)
      self._best.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(to_pure(params)), metrics=ocp.args.JsonSave(metrics)),
          metrics=metrics)
      self._best.wait_until_finished()

  def best_step(self) -> int | None:
    self._best.reload()
    return self._best.best_step()

  def best_metrics(self) -> dict[str, float] | None:
    """The eval metrics of the best checkpoint, or None before the first ``save_best``."""
    step = self.best_step()
    if step is None:
      return None
    with self._reading("best"):
      restored = self._best.restore(step, args=ocp.args.Composite(
          metrics=ocp.args.JsonRestore()))
      return dict(restored["metrics"])

  def restore_best_params(self, abstract_params: Any) -> Any:
    """The best params, placed on the shardings of ``abstract_params``."""
    step = self.best_step()
    if step is None:
      raise RestJaxError(f"no best checkpoint in {self.directory / 'best'}; the phase has not "
                         "evaluated yet, rerun it.")
    _check_abstract(abstract_params)
    with self._reading("best"):
      restored = self._best.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(to_pure(abstract_params))))
    return from_pure(abstract_params, restored["params"])

  def discard_best_after(self, step: int) -> None:
    """Deletes best checkpoints newer than ``step`` (left by a run that crashed after them)."""
    self._best.reload()
    newer = [s for s in self._best.all_steps() if s > step]
    distributed.barrier(f"{self.directory} best read before discarding after {step}")
    for s in newer:
      self._best.delete(s)
    distributed.barrier(f"{self.directory} best discarded after {step}")
