"""A crash at any moment: the smoke experiment (CLI, a real process) is SIGKILLed at many
moments spread over its whole run, each time rerun with the same command, and ends exactly
where an uninterrupted run ends (summary rows, Grow records, final parameters).

The kill moments are drawn uniformly over the measured duration of an uninterrupted run. Each
moment ``t`` is replayed on the interrupted workdir as "the last file the uninterrupted run had
committed by ``t``, plus the time it had run since": the attempt waits until that file exists
(or starts with it), waits the same extra time, and is killed. So the kills walk through the
whole run however long each rerun's start-up takes.
"""

import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import SMOKE, SMOKE_SHRINK, committed_files, start_smoke_run
from rest_jax.cli import main as cli
from rest_jax.grow import dataset as growdata
from rest_jax.pipeline import build
from rest_jax.pipeline.workdir import Workdir, phase_name

SHRINK = SMOKE_SHRINK
NUM_KILLS = 10
_PHASE_START = re.compile(r"INFO (BC: training|Grow g\d+: \d+ prompts|Improve g\d+ i\d+: "
                          r"threshold)")


def _start(workdir: str, log: str) -> subprocess.Popen:
  return start_smoke_run(workdir, log, SHRINK, append=False)


def _committed_files(workdir: str) -> list[tuple[float, str]]:
  """(mtime, path relative to workdir) of every committed file (no temporaries), by mtime."""
  return sorted((os.path.getmtime(os.path.join(workdir, p)), p) for p in committed_files(workdir))


def _milestones(workdir: str, t0: float) -> list[tuple[float, str]]:
  """(seconds after ``t0`` it was committed, path) of what a run commits under names that do
  not vary between runs: a checkpoint's step folder (orbax renames it into place when complete;
  the data files inside have random names) and every other file but TensorBoard's."""
  commits: dict[str, float] = {}
  for t, path in _committed_files(workdir):
    parts = path.split(os.sep)
    if parts[0] == "tb":
      continue
    key = os.sep.join(parts[:4]) if parts[0] == "checkpoints" else path
    commits[key] = max(commits.get(key, 0.0), t - t0)
  return sorted((t, key) for key, t in commits.items())


def _records(workdir: str) -> dict:
  out = {}
  for g in (1, 2):
    for r in growdata.read_records(os.path.join(workdir, "grow", f"g{g:03d}")):
      out[(g, r.example_id, r.sample_idx)] = (tuple(r.targets), r.reward)
  return out


def _final_params(workdir: str) -> list[np.ndarray]:
  config, _ = cli.parse_run_config([SMOKE], [a[len("--gin."):] for a in SHRINK])
  params = build.build(config, Workdir(workdir), progress=False).restore_best(phase_name(2, 2))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _phase_at_kill(workdir: str, log: str) -> str:
  """The phase an attempt was in when killed: 'start-up' before it began one, else the phase
  that state.json names."""
  if not _PHASE_START.search(open(log, errors="replace").read()):
    return "start-up"
  return json.load(open(os.path.join(workdir, "state.json")))["phase"]


@pytest.mark.slow
def test_sigkill_at_many_moments_then_rerun_equals_uninterrupted(tmp_path):
  ref_dir = str(tmp_path / "ref")
  t0 = time.time()
  proc = _start(ref_dir, str(tmp_path / "ref.log"))
  assert proc.wait(timeout=600) == 0, open(tmp_path / "ref.log").read()[-3000:]
  duration = time.time() - t0
  timeline = _milestones(ref_dir, t0)

  rng = np.random.default_rng(15)
  moments = sorted(rng.uniform(0.0, duration, NUM_KILLS))
  work = str(tmp_path / "work")
  kills = []
  for k, moment in enumerate(moments):
    before = [(t, p) for t, p in timeline if t <= moment]
    milestone, extra = (before[-1][1], moment - before[-1][0]) if before else (None, moment)
    log = str(tmp_path / f"attempt{k}.log")
    started = time.time()
    proc = _start(work, log)
    if milestone is not None:
      while not os.path.exists(os.path.join(work, milestone)) and proc.poll() is None:
        time.sleep(0.02)
      reached = time.time()
    else:
      reached = started
    while time.time() < reached + extra and proc.poll() is None:
      time.sleep(0.01)
    if proc.poll() is not None:  # It finished (or failed) before the kill.
      assert proc.returncode == 0, open(log).read()[-3000:]
      kills.append({"moment_s": round(moment, 1), "phase": "finished first"})
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append({"moment_s": round(moment, 1), "after_start_s": round(time.time() - started, 1),
                  "phase": _phase_at_kill(work, log)})

  final_log = str(tmp_path / "final.log")
  proc = _start(work, final_log)
  assert proc.wait(timeout=600) == 0, open(final_log).read()[-3000:]
  print(f"\nuninterrupted run: {duration:.1f} s; kills: {json.dumps(kills)}")
  phases = {}
  for kill in kills:
    phases[kill["phase"]] = phases.get(kill["phase"], 0) + 1
  print(f"kills per phase: {phases}")

  ref = json.load(open(os.path.join(ref_dir, "summary.json")))
  got = json.load(open(os.path.join(work, "summary.json")))
  assert got["rows"] == ref["rows"]
  assert _records(work) == _records(ref_dir)
  for a, b in zip(_final_params(work), _final_params(ref_dir), strict=True):
    np.testing.assert_array_equal(a, b)
  # No temporary or half-written file is left behind.
  leftovers = [p for _, p in _committed_files(work) if ".tmp" in p]
  assert not leftovers
  assert len([k for k in kills if k["phase"] != "finished first"]) >= NUM_KILLS - 2
