"""Sweep expansion and naming, the sweep CLI (dry runs, skipping finished runs), compare."""

import json
import os

import pytest

from rest_jax.cli import compare

from rest_jax.cli import launchers

from rest_jax.cli import main

from rest_jax.cli import sweep
from rest_jax.errors import RestJaxError
from rest_jax.pipeline.reporting import summary_row


def test_expand_cartesian_product_and_names():
  axes = [sweep.parse_axis("improve/config.TrainConfig.loss='bc','reward_weighted_bc'"),
          sweep.parse_axis("config.SamplingConfig.num_samples=2,4,8")]
  runs = sweep.expand(axes)
  assert [name for name, _ in runs] == [
      "loss=bc,num_samples=2", "loss=bc,num_samples=4", "loss=bc,num_samples=8",
      "loss=reward_weighted_bc,num_samples=2", "loss=reward_weighted_bc,num_samples=4",
      "loss=reward_weighted_bc,num_samples=8"]
  assert runs[4][1] == ("improve/config.TrainConfig.loss='reward_weighted_bc'",
                        "config.SamplingConfig.num_samples=4")


def test_values_and_name_collisions():
  assert sweep.split_values("[0.0, 0.7],[0.5, 0.9],'a,b'") == ["[0.0, 0.7]", "[0.5, 0.9]", "'a,b'"]
  assert sweep.short_names(["bc/config.TrainConfig.learning_rate",
                            "improve/config.TrainConfig.learning_rate", "config.RunConfig.seed"]
                           ) == ["bc.learning_rate", "improve.learning_rate", "seed"]
  axes = [sweep.parse_axis("config.ImproveConfig.thresholds=[0.0, 0.7],[0.5, 0.9]"),
          sweep.parse_axis("config.RunConfig.task='a/b'")]
  assert [n for n, _ in sweep.expand(axes)] == ["thresholds=0.0_0.7,task=a_b",
                                                "thresholds=0.5_0.9,task=a_b"]
  for bad in ("config.RunConfig.seed", "config.RunConfig.seed=1,,2", "config.RunConfig.seed=1,1"):
    with pytest.raises(RestJaxError, match="--sweep"):
      sweep.parse_axis(bad)
  with pytest.raises(RestJaxError, match="same directory name"):
    sweep.expand([sweep.parse_axis("config.RunConfig.task='a b','a/b'")])


def test_plan_workdirs_and_override_order(tmp_path):
  runs = sweep.plan(str(tmp_path), ["x.gin"], ["config.RunConfig.seed=3"],
                    [sweep.parse_axis("config.RunConfig.seed=1,2")])
  assert [(n, r.workdir, r.overrides) for n, r in runs] == [
      ("seed=1", str(tmp_path / "seed=1"), ("config.RunConfig.seed=3", "config.RunConfig.seed=1")),
      ("seed=2", str(tmp_path / "seed=2"), ("config.RunConfig.seed=3", "config.RunConfig.seed=2"))]


def _finish(workdir, rewards, wall):
  os.makedirs(workdir, exist_ok=True)
  rows = [summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None,
                      train_examples=100, eval_reward=rewards[0], eval_exact_match=0.1)]
  rows += [summary_row(phase="improve", grow_step=0, improve_step=i, threshold=0.1 * i,
                       train_examples=50, eval_reward=r, eval_exact_match=0.2)
           for i, r in enumerate(rewards[1:], start=1)]
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"rows": rows, "wall_time_s": wall}, f)
  with open(os.path.join(workdir, "state.json"), "w") as f:
    json.dump({"phase": "done", "wall_time_s": wall}, f)


def test_sweep_cli_dry_run_skips_finished_runs(tmp_path, capsys):
  root = str(tmp_path / "sw")
  _finish(os.path.join(root, "num_samples=2"), [0.5, 0.6], 10.0)
  argv = ["sweep", "--root", root, "--gin_file", "a.gin", "--sweep",
          "config.SamplingConfig.num_samples=2,4", "--gin.config.RunConfig.seed=1", "--dry-run"]
  assert main.main(argv) == 0
  assert capsys.readouterr().out == (
      "# num_samples=2: finished, skipped\n# num_samples=4\n"
      f"env JAX_PLATFORMS=cpu rest-jax run --workdir {root}/num_samples=4 --gin_file a.gin "
      "--gin.config.RunConfig.seed=1 --gin.config.SamplingConfig.num_samples=4\n")
  assert not os.path.exists(os.path.join(root, sweep.SWEEP_FILE))  # A dry run writes nothing.
  assert main.main(argv[:-1] + ["--launcher", "slurm", "--dry-run", "--", "--nodes", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count("#SBATCH --nodes=2") == 2 and "#SBATCH --job-name=rest-jax-1" in out
  assert f"sbatch {root}/num_samples=4/launch.sbatch" in out


def test_sweep_runs_locally_and_writes_manifest(tmp_path, monkeypatch, capsys):
  executed = []
  monkeypatch.setattr(launchers.subprocess, "call", lambda cmd: executed.append(cmd) or 0)
  root = str(tmp_path)
  _finish(os.path.join(root, "seed=1"), [0.5], 1.0)
  assert main.main(["sweep", "--root", root, "--gin_file", "a.gin",
                    "--sweep", "config.RunConfig.seed=1,2"]) == 0
  assert executed == [["env", "JAX_PLATFORMS=cpu", "rest-jax", "run", "--workdir",
                       f"{root}/seed=2", "--gin_file", "a.gin", "--gin.config.RunConfig.seed=2"]]
  manifest = json.load(open(os.path.join(root, sweep.SWEEP_FILE)))
  assert [(r["name"], r["workdir"]) for r in manifest["runs"]] == [
      ("seed=1", f"{root}/seed=1"), ("seed=2", f"{root}/seed=2")]
  monkeypatch.setattr(launchers.subprocess, "call", lambda cmd: 3)
  assert main.main(["sweep", "--root", root, "--gin_file", "a.gin",
                    "--sweep", "config.RunConfig.seed=2"]) == 2
  assert "exited with status 3" in capsys.readouterr().err


def test_compare_table_and_plot(tmp_path, capsys):
  root = str(tmp_path / "sw")
  _finish(os.path.join(root, "loss=bc"), [0.5, 0.7, 0.65], 12.5)
  _finish(os.path.join(root, "loss=rwbc"), [0.5, 0.55], 8.0)
  with open(os.path.join(root, sweep.SWEEP_FILE), "w") as f:
    json.dump({"runs": [{"name": n, "workdir": os.path.join(root, n)}
                        for n in ("loss=bc", "loss=rwbc")]}, f)
  out_png = str(tmp_path / "plots" / "cmp.png")
  assert main.main(["compare", root, "--out", out_png]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("held-out (D_eval) mean of each run's own reward")
  lines = lines[1:]
  assert lines[0].split() == ["run", "reward", "phases", "bc", "final", "best", "best", "at",
                              "exact", "monitor", "wall", "s"]
  # The runs have no run_config.json: their reward is unknown ("?"), no monitor ("-").
  assert lines[2].split() == ["loss=bc", "?", "3", "0.5000", "0.6500", "0.7000", "g0", "i1",
                              "0.200", "-", "12.5"]
  assert lines[3].split() == ["loss=rwbc", "?", "2", "0.5000", "0.5500", "0.5500", "g0", "i1",
                              "0.200", "-", "8.0"]
  assert lines[4] == f"wrote {out_png}"
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert compare.resolve_workdirs([os.path.join(root, "loss=bc")]) == [
      os.path.join(root, "loss=bc")]
  assert main.main(["compare", str(tmp_path / "nothing")]) == 2
  assert "has not finished" in capsys.readouterr().err
