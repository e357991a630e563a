"""A ReST run as a plan of phases: BC, then G x (Grow, I x Improve), resumable from the workdir.

``plan(config)`` lists the phases; ``run`` checks the workdir, builds the run once
(``pipeline.build``) and executes each phase that has not finished (``pipeline.phases``). A
finished phase is skipped; an unfinished one resumes from its last completed Grow chunk or
training checkpoint. Rerunning the same command therefore resumes the experiment.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

from rest_jax import buckets
from rest_jax.config import RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.online import cost, loop
from rest_jax.parallel import distributed, preemption
from rest_jax.pipeline import build, phases, rescore
from rest_jax.pipeline.workdir import Workdir, phase_name

logger = logging.getLogger("rest_jax")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of the plan. ``count``: Improve steps of the run up to and including this one."""

  kind: str  # "bc", "grow" or "improve".
  grow_step: int = 0
  improve_step: int = 0
  count: int = 0

  @property
  def name(self) -> str:
    if self.kind == "grow":
      return f"grow g{self.grow_step}"
    return phase_name(self.grow_step, self.improve_step)


def plan(config: RunConfig) -> list[Phase]:
  """BC, then for g = 1..G: Grow g and Improve (g, 1..I) (only BC for the online algorithms,
  whose loop ``rest_jax.online.loop`` runs after it)."""
  phases_: list[Phase] = [Phase("bc")]
  if config.algorithm != "rest":
    return phases_
  count = 0
  for g in range(1, config.num_grow_steps + 1):
    phases_.append(Phase("grow", g))
    for i in range(1, config.num_improve_steps + 1):
      count += 1
      phases_.append(Phase("improve", g, i, count))
  return phases_


def check_workdir(workdir: Workdir, config: RunConfig) -> None:
  """Refuses a workdir made by another config (every host looks before anything is written)."""
  diffs = workdir.config_differences(config)
  shared = workdir.shared_differences(config)
  workdir.check_state_files()
  distributed.barrier("workdir checked")
  if diffs:
    raise RestJaxError(
        f"workdir {workdir.root} was made by a different config ({'; '.join(diffs[:5])}). "
        "Rerun with the gin files and overrides of that run (see its config.gin) to resume, "
        "or choose a new --workdir.")
  if shared and shared[1]:
    raise RestJaxError(
        f"workdir {workdir.root} starts from the BC phase and Grow step 1 of {shared[0]} "
        f"(rest-jax sweep --share_grow), but this config changes what they read "
        f"({'; '.join(shared[1][:5])}). Share only across Improve-only bindings (loss, "
        "thresholds, improve/...), or run the sweep without --share_grow in a new --root.")


@dataclasses.dataclass
class _Progress:
  """What the phases of one ``run`` call have produced so far."""

  rows: list[dict] = dataclasses.field(default_factory=list)
  grow_stats: dict[int, dict] = dataclasses.field(default_factory=dict)
  taus: dict[int, list[float]] = dataclasses.field(default_factory=dict)


def _state_name(phase: Phase) -> str:
  """The phase as state.json names it: "bc", "grow g1", "improve g1 i2"."""
  if phase.kind == "improve":
    return f"improve g{phase.grow_step} i{phase.improve_step}"
  return phase.name


def _run_phases(run_: build.Run, config: RunConfig, wd: Workdir,
                save_state: Callable[[str], None], progress: _Progress) -> None:
  """Executes each phase of ``plan(config)`` that has not finished, in order."""
  policies = phases.Policies(run_)
  current: phases.GrowPlan | None = None
  last = "bc"
  spent = cost.Cost()  # Samples and FLOPs so far (every row carries them).
  for phase in plan(config):
    preemption.check(f"before {phase.name}")  # Nothing of this phase has run yet.
    g, i = phase.grow_step, phase.improve_step
    if phase.kind == "grow":
      if not growdata.is_complete(wd.grow_dir(g)):
        save_state(_state_name(phase))
        phases.grow(run_, g, policies.get(last))
      spent += loop.phase_cost(run_, "grow", phase.name, g)
      current = phases.plan_improve(run_, g)
      progress.grow_stats[g] = current.stats
      progress.taus[g] = [t.value for t in current.thresholds]
      continue
    summary = wd.marked(phase.name)
    if summary is None and phase.kind == "bc":
      if config.run_bc:
        save_state("bc")
      summary = (phases.bc if config.run_bc else phases.skip_bc)(run_, policies)
    elif summary is None:
      save_state(_state_name(phase))
      restart = config.improve.restart_from_base and i == 1
      summary = phases.improve(run_, policies, g=g, i=i, tau=current.thresholds[i - 1],
                               start_params=policies.get("bc" if restart else last),
                               count=phase.count)
    last = phase.name
    policies.forget_except("bc", last)
    spent += loop.phase_cost(run_, phase.kind, phase.name)
    progress.rows.append({**summary, **spent.as_row()})
    logger.info("%s: eval reward %.4f, exact match %.3f%s", "BC" if phase.kind == "bc" else
                f"Improve g{g} i{i}", summary["eval_reward"], summary["eval_exact_match"],
                "" if summary.get("test_reward") is None else
                f"; test reward {summary['test_reward']:.4f}")

  if config.algorithm != "rest":
    save_state(config.algorithm)
    progress.rows += loop.online_phase(run_, policies.get("bc"), spent)


def run(config: RunConfig, workdir: str, *, config_text: str = "", progress: bool = True) -> dict:
  """Runs (or resumes) a whole ReST experiment in ``workdir``; returns the summary dict (as in
  summary.json, plus "monitor_tolerance": ``EvalConfig.monitor_tolerance``).

  The workdir is written only after the whole run has been built, so a config that cannot
  start (unknown name, bad size, vocabulary mismatch) leaves it untouched. On SIGTERM every
  host stops at the same check point, the current phase keeps what it has done (a training
  phase saves its step) and ``preemption.Preempted`` is raised; rerunning resumes. A ``gs://``
  workdir's bucket is checked first (``buckets.check_workdir``).
  """
  start = time.time()
  buckets.check_workdir(workdir)  # A gs:// bucket that cannot be used: one error, before work.
  wd = Workdir(workdir)
  build.validate(config)
  check_workdir(wd, config)
  if config.improve.reward_version:  # An unknown version fails before anything runs.
    rescore.recorded_spec(wd, config.improve.reward_version)
  preemption.install()
  try:
    run_ = build.build(config, wd, progress=progress)
    if distributed.is_host0() and wd.config_differences(config) is None:
      wd.record_config(config, config_text)
    distributed.barrier("workdir recorded")
    previous_wall = wd.previous_wall_time()
    # A rerun of a finished run does no work and adds nothing to wall_time_s.
    worked = not wd.is_finished()
    phase = ["start"]

    def save_state(name: str) -> None:
      phase[0] = name
      if distributed.is_host0() and worked:
        wd.write_state(name, previous_wall + time.time() - start)

    done = _Progress()
    try:
      _run_phases(run_, config, wd, save_state, done)
    except preemption.Preempted:  # The time worked so far counts in wall_time_s.
      save_state(phase[0])
      run_.reporter.close()
      raise
  finally:
    preemption.uninstall()
  save_state("done")
  distributed.barrier("done")
  wall = wd.previous_wall_time()
  summary = run_.reporter.write_summary(done.rows, wall)
  run_.reporter.write_plots(done.rows, done.grow_stats, done.taus)
  run_.reporter.close()
  logger.info("wrote %s (rest_jax.pipeline.reporting.format_result prints it as a table)",
              wd.summary_path)
  return {**summary, "monitor_tolerance": config.eval.monitor_tolerance}
