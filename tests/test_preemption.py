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
import sys
import time

import jax
import numpy as np
import pytest

from rest_jax.cli import main as cli
from rest_jax.errors import EXIT_PREEMPTED
from rest_jax.grow import dataset as growdata
from rest_jax.parallel import preemption
from rest_jax.pipeline import build
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.workdir import Workdir, phase_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")


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
