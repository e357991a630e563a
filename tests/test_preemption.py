"""SIGTERM (a TPU maintenance event, SLURM preemption, ``kill``): ``rest-jax run`` stops at a
check point, keeps its work and exits with 75; rerunning the same command resumes.

The fast tests here cover the CLI; the train loop and the Grow step are covered in
test_improve.py and test_grow.py (SIGTERM mid-phase, rerun equal to uninterrupted). The slow
test sends a real SIGTERM from outside to a ``rest-jax run`` process during Grow and during
Improve, reruns it, and compares with an uninterrupted run (2 processes: test_multihost.py).
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import SMOKE, SMOKE_SHRINK, start_smoke_run
from rest_jax.cli import main as cli
from rest_jax.errors import EXIT_PREEMPTED
from rest_jax.grow import dataset as growdata
from rest_jax.parallel import preemption
from rest_jax.pipeline import build
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.workdir import Workdir, phase_name



def test_sigterm_exits_75_with_one_message_and_no_traceback(tmp_path, capsys, monkeypatch):
  checks = []

  def preempted_run(config, workdir, **kwargs):  # The pipeline's protocol, with a real signal.
    preemption.install()
    try:
      preemption.check("before bc")
      os.kill(os.getpid(), signal.SIGTERM)
      checks.append(signal.getsignal(signal.SIGTERM))
      preemption.check("before bc")
    finally:
      preemption.uninstall()
    raise AssertionError("no stop after SIGTERM")

  monkeypatch.setattr(pipeline, "run", preempted_run)
  code = cli.main(["run", "--workdir", str(tmp_path), "--gin_file", SMOKE, "--no_progress"])
  err = capsys.readouterr().err
  assert code == EXIT_PREEMPTED == 75, err
  assert len(checks) == 1 and "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("rest-jax: preempted")]
  assert lines == ["rest-jax: preempted (SIGTERM): stopped before bc, all finished work is "
                   "saved. Rerun the same command to resume. (exit code 75)"], err
  assert "rest-jax: SIGTERM received; stopping at the next check point" in err
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The handler is removed again.


# The smoke experiment, 1 Grow x 2 Improve, with fewer steps and a smaller eval set.
SHRINK = ["--gin.config.RunConfig.num_grow_steps=1", *SMOKE_SHRINK]


def _start(workdir: str, log: str) -> subprocess.Popen:
  return start_smoke_run(workdir, log, SHRINK)


def _sigterm_at(workdir: str, log: str, pattern: str) -> tuple[int, float, str]:
  """Runs until the log shows ``pattern``, sends SIGTERM; (exit code, seconds from the signal
  to the exit, the preemption line)."""
  offset = os.path.getsize(log) if os.path.exists(log) else 0

  def since() -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
      f.seek(offset)
      return f.read()

  proc = _start(workdir, log)
  while proc.poll() is None and pattern not in since():
    time.sleep(0.02)
  assert proc.poll() is None, since()[-3000:]
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=600)
  seconds = time.time() - sent
  lines = [l for l in since().splitlines() if l.startswith("rest-jax: preempted")]
  return code, seconds, lines[-1] if lines else since()[-3000:]


def _records(workdir: str) -> dict:
  return {(r.example_id, r.sample_idx): (tuple(r.targets), r.reward)
          for r in growdata.read_records(os.path.join(workdir, "grow", "g001"))}


def _final_params(workdir: str) -> list[np.ndarray]:
  config, _ = cli.parse_run_config([SMOKE], [a[len("--gin."):] for a in SHRINK])
  params = build.build(config, Workdir(workdir), progress=False).restore_best(phase_name(1, 2))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_sigterm_in_grow_and_in_improve_then_rerun_equals_uninterrupted(tmp_path):
  ref = str(tmp_path / "ref")
  assert _start(ref, str(tmp_path / "ref.log")).wait(timeout=900) == 0

  work, log = str(tmp_path / "work"), str(tmp_path / "work.log")
  code, grow_s, grow_line = _sigterm_at(work, log, "Grow g1: ")
  assert code == 75, grow_line
  assert grow_line.startswith("rest-jax: preempted (SIGTERM): grow g1 kept its complete chunks")
  assert grow_line.endswith("Rerun the same command to resume. (exit code 75)")
  assert not growdata.is_complete(os.path.join(work, "grow", "g001"))

  code, improve_s, improve_line = _sigterm_at(work, log, "g001_i01 step 0:")
  assert code == 75, improve_line
  # The first train step compiles: the stop comes after it, between two evaluations.
  assert improve_line.startswith("rest-jax: preempted (SIGTERM): g001_i01 saved at step 1 of 6")
  assert json.load(open(os.path.join(work, "state.json")))["phase"] == "improve g1 i1"

  assert _start(work, log).wait(timeout=900) == 0, open(log).read()[-3000:]
  print(f"\nSIGTERM to exit: {grow_s:.1f} s in Grow ({grow_line}); {improve_s:.1f} s in Improve "
        f"({improve_line})")
  got, expected = (json.load(open(os.path.join(d, "summary.json"))) for d in (work, ref))
  assert got["rows"] == expected["rows"]
  assert _records(work) == _records(ref)
  for a, b in zip(_final_params(work), _final_params(ref), strict=True):
    np.testing.assert_array_equal(a, b)
