"""The CLI: every gin file parses; bad input gets one clear error (exit 2, no traceback) and
leaves the workdir as it was."""

import glob
import hashlib
import os
import re

import numpy as np
import pytest

from rest_jax.cli import main as cli
from rest_jax import rewards
from rest_jax.config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
FAST = ["--gin.bc/config.TrainConfig.num_steps=2", "--gin.bc/config.TrainConfig.eval_every=1",
        "--gin.config.RunConfig.num_grow_steps=1", "--gin.config.EvalConfig.num_examples=4",
        "--gin.config.SamplingConfig.num_samples=1"]


def _snapshot(workdir):
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
    if os.path.isfile(path):
      out[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _run(argv, capsys):
  code = cli.main(argv)
  err = capsys.readouterr().err
  return code, err


def _needs_user_paths(path):
  text = open(path, encoding="utf-8").read()
  includes = re.findall(r"^include '([^']+)'", text, flags=re.M)
  return "/path/to/" in text or any(_needs_user_paths(os.path.join(REPO, "gin", i))
                                    for i in includes)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "**", "*.gin"),
                                               recursive=True)))
def test_every_gin_file_parses(path, tmp_path):
  if _needs_user_paths(path):
    pytest.skip("needs the user's paths: parsed with overrides in test_experiment_configs.py")
  files = [path] if "/experiments/" in path else [os.path.join(REPO, "gin/runs/base.gin"), path]
  config, text = cli.parse_run_config(files, [])
  assert isinstance(config, RunConfig)
  # The operative config text (what a run records) parses back to the same RunConfig.
  (tmp_path / "operative.gin").write_text(text)
  assert cli.parse_run_config([str(tmp_path / "operative.gin")], [])[0] == config


@pytest.mark.parametrize("binding, fragment", [
    ("--gin.config.RunConfig.num_grow_stepz=1", "num_grow_stepz"),
    ("--gin.config.RunConfig.task='no_such_task'", "task 'no_such_task' is not registered"),
    ("--gin.config.RunConfig.reward='no_such_reward'", "reward 'no_such_reward' is unknown"),
    ("--gin.improve/config.TrainConfig.loss='no_such_loss'", "no_such_loss"),
    ("--gin.config.ImproveConfig.thresholds=[0.9, 0.5]", "strictly increasing"),
    ("--gin.config.SamplingConfig.temperature=-1.0", "temperature"),
])
def test_bad_config_is_one_clear_error(tmp_path, capsys, binding, fragment):
  work = str(tmp_path / "w")
  code, err = _run(["run", "--workdir", work, "--gin_file", SMOKE, binding], capsys)
  assert code == 2
  assert err.startswith("rest-jax: error:") and fragment in err
  assert "Traceback" not in err
  assert not os.path.exists(work)  # Nothing was written for a config that cannot run.


def test_missing_gin_file(tmp_path, capsys):
  code, err = _run(["run", "--workdir", str(tmp_path), "--gin_file", "nope.gin"], capsys)
  assert code == 2 and "gin file 'nope.gin' does not exist" in err


def test_workdir_from_another_config_is_refused(tmp_path, capsys):
  work = str(tmp_path / "w")
  from rest_jax.pipeline.workdir import Workdir
  config, text = cli.parse_run_config([SMOKE], [])
  Workdir(work).record_config(config, text)
  before = _snapshot(work)
  code, err = _run(["run", "--workdir", work, "--gin_file", SMOKE,
                    "--gin.config.RunConfig.seed=7"], capsys)
  assert code == 2 and "was made by a different config" in err and "seed" in err
  assert _snapshot(work) == before


class ConstantReward:
  value = np.nan

  def __call__(self, sources, hypotheses, references):
    return np.full(len(hypotheses), self.value, dtype=np.float32)


class TooHighReward(ConstantReward):
  value = 1.5


@pytest.mark.parametrize("reward_cls", [ConstantReward, TooHighReward])
def test_reward_that_is_nan_or_outside_0_1_is_refused(tmp_path, capsys, monkeypatch,
                                                      reward_cls):
  monkeypatch.setitem(rewards.REWARDS, "bad_reward", reward_cls)
  work = str(tmp_path / "w")
  code, err = _run(["run", "--workdir", work, "--gin_file", SMOKE, "--no_progress",
                    "--gin.config.RunConfig.reward='bad_reward'"] + FAST, capsys)
  assert code == 2 and "bad_reward" in err and "Traceback" not in err
  assert ("nan" in err.lower()) if reward_cls is ConstantReward else ("1.5" in err)
  assert not os.path.exists(os.path.join(work, "phases", "bc.json"))


def test_threshold_that_keeps_nothing(tmp_path, capsys):
  work = str(tmp_path / "w")
  argv = ["run", "--workdir", work, "--gin_file", SMOKE, "--no_progress",
          "--gin.config.GrowConfig.include_originals=False",
          "--gin.config.ImproveConfig.thresholds=[1.0]"] + FAST
  code, err = _run(argv, capsys)
  assert code == 2 and "keeps no example" in err and "Lower the threshold" in err
  before = _snapshot(work)
  assert "grow/g001/COMPLETED" in before and "phases/bc.json" in before
  # Rerunning the same command gives the same error and changes nothing on disk.
  code, err2 = _run(argv, capsys)
  assert code == 2 and "keeps no example" in err2
  after = _snapshot(work)
  assert {k: v for k, v in after.items() if not k.startswith(("state.json", "tb/"))} == {
      k: v for k, v in before.items() if not k.startswith(("state.json", "tb/"))}


def test_run_help_documents_gin_flags_quoting_and_defaults(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["run", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for fragment in ("--gin_file", "--gin.NAME=VALUE",
                   "--gin.config.RunConfig.task=\"'arith_small'\"", "Strings need their own quotes",
                   "(default: INFO)", "examples:"):
    assert fragment in out, fragment
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("rest-jax ")


@pytest.mark.parametrize("binding, fragment", [
    ("--gin.config.RunConfig.task=arith_small",
     "--gin.config.RunConfig.task=\"'arith_small'\""),
    ("--gin.config.RunConfig.task='arith_small", "--gin.config.RunConfig.task=\"'arith_small'\""),
    ("--gin.TRAIN_FILE=data/train.jsonl", "--gin.TRAIN_FILE=\"'data/train.jsonl'\""),
    ("--gin.config.SamplingConfig.temperature=-1.0", "(in SamplingConfig)"),
])
def test_gin_errors_name_the_binding_and_fix_in_one_line(tmp_path, capsys, binding, fragment):
  code, err = _run(["run", "--workdir", str(tmp_path / "w"), "--gin_file", SMOKE, binding],
                   capsys)
  assert code == 2 and fragment in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "w")


def test_a_runs_folder_in_the_current_directory_does_not_break_gin_includes(tmp_path,
                                                                           monkeypatch):
  # gin tries include 'runs/base.gin' as a file of a Python package `runs`: a plain folder of
  # that name (e.g. the README's runs/ workdirs) is not one.
  (tmp_path / "runs" / "smoke").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  config, _ = cli.parse_run_config([SMOKE], [])
  assert config.task == "numbers_de_en_small"


def test_native_start_up_lines_are_held_back_unless_the_block_fails(capfd):
  from rest_jax.cli import quiet
  with quiet.quiet_native_stderr():
    os.write(2, b"I0000 cudart_stub.cc: Could not find cuda drivers\n")
  assert "cuda" not in capfd.readouterr().err
  with pytest.raises(RuntimeError):
    with quiet.quiet_native_stderr():
      os.write(2, b"libfoo: the reason it failed\n")
      raise RuntimeError("boom")
  assert "the reason it failed" in capfd.readouterr().err
