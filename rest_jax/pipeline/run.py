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

from rest_jax.config import RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.parallel import distributed
from rest_jax.online import cost, loop
from rest_jax.pipeline import build, phases
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
  workdir.check_state_files()
  distributed.barrier("workdir checked")
  if diffs:
    raise RestJaxError(
        f"workdir {workdir.root} was made by a different config ({'; '.join(diffs[:5])}). "
        "Rerun with the gin files and overrides of that run (see its config.gin) to resume, "
        "or choose a new --workdir.")


def run(config: RunConfig, workdir: str, *, config_text: str = "", progress: bool = True) -> dict:
  """Runs (or resumes) a whole ReST experiment in ``workdir``; returns the summary dict (as in
  summary.json, plus "monitor_tolerance": ``EvalConfig.monitor_tolerance``).

  The workdir is written only after the whole run has been built, so a config that cannot
  start (unknown name, bad size, vocabulary mismatch) leaves it untouched.
  """
  start = time.time()
  wd = Workdir(workdir)
  build.validate(config)
  check_workdir(wd, config)
  run_ = build.build(config, wd, progress=progress)
  if distributed.is_host0() and wd.config_differences(config) is None:
    wd.record_config(config, config_text)
  distributed.barrier("workdir recorded")
  previous_wall = wd.previous_wall_time()

  # A rerun of a finished run does no work and adds nothing to wall_time_s.
  worked = not wd.is_finished()

  def save_state(phase: str) -> None:
    if distributed.is_host0() and worked:
      wd.write_state(phase, previous_wall + time.time() - start)

  policies = phases.Policies(run_)
  rows: list[dict] = []
  grow_stats: dict[int, dict] = {}
  taus: dict[int, list[float]] = {}
  current: phases.GrowPlan | None = None
  last = "bc"
  spent = cost.Cost()  # Samples and FLOPs so far (every row carries them).
  for phase in plan(config):
    g, i = phase.grow_step, phase.improve_step
    if phase.kind == "grow":
      if not growdata.is_complete(wd.grow_dir(g)):
        save_state(phase.name)
        phases.grow(run_, g, policies.get(last))
      spent += loop.phase_cost(run_, "grow", phase.name, g)
      current = phases.plan_improve(run_, g)
      grow_stats[g], taus[g] = current.stats, [t.value for t in current.thresholds]
      continue
    summary = wd.marked(phase.name)
    if summary is None and phase.kind == "bc":
      if config.run_bc:
        save_state("bc")
      summary = (phases.bc if config.run_bc else phases.skip_bc)(run_, policies)
    elif summary is None:
      save_state(f"improve g{g} i{i}")
      restart = config.improve.restart_from_base and i == 1
      summary = phases.improve(run_, policies, g=g, i=i, tau=current.thresholds[i - 1],
                               start_params=policies.get("bc" if restart else last),
                               count=phase.count)
    last = phase.name
    policies.forget_except("bc", last)
    spent += loop.phase_cost(run_, phase.kind, phase.name)
    rows.append({**summary, **spent.as_row()})
    logger.info("%s: eval reward %.4f, exact match %.3f%s", "BC" if phase.kind == "bc" else
                f"Improve g{g} i{i}", summary["eval_reward"], summary["eval_exact_match"],
                "" if summary.get("test_reward") is None else
                f"; test reward {summary['test_reward']:.4f}")

  if config.algorithm != "rest":
    save_state(config.algorithm)
    rows += loop.online_phase(run_, policies.get("bc"), spent)
  save_state("done")
  distributed.barrier("done")
  wall = wd.previous_wall_time()
  summary = run_.reporter.write_summary(rows, wall)
  run_.reporter.write_plots(rows, grow_stats, taus)
  run_.reporter.close()
  logger.info("wrote %s (rest_jax.pipeline.reporting.format_result prints it as a table)",
              wd.summary_path)
  return {**summary, "monitor_tolerance": config.eval.monitor_tolerance}
