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


def _finish(workdir, rewards, wall, test=None, config=None):
  """A fabricated finished run: validation ``rewards`` per phase, optional ``test`` rewards and
  an optional recorded config (run_config.json)."""
  os.makedirs(workdir, exist_ok=True)
  test = test or [None] * len(rewards)
  rows = [summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None,
                      train_examples=100, eval_reward=rewards[0], eval_exact_match=0.1,
                      test=None if test[0] is None else {"test_reward": test[0]})]
  rows += [summary_row(phase="improve", grow_step=0, improve_step=i, threshold=0.1 * i,
                       train_examples=50, eval_reward=r, eval_exact_match=0.2,
                       test=None if t is None else {"test_reward": t})
           for i, (r, t) in enumerate(zip(rewards[1:], test[1:]), start=1)]
  if config is not None:
    with open(os.path.join(workdir, "run_config.json"), "w") as f:
      json.dump(config, f)
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
  assert lines[0].startswith("validation (D_eval) mean of each run's own reward")
  lines = lines[1:]
  assert lines[0].split() == ["run", "reward", "phases", "bc", "final", "best", "best", "at",
                              "exact", "monitor", "test", "wall", "s"]
  # The runs have no run_config.json: their reward is unknown ("?"), no monitor ("-").
  assert lines[2].split() == ["loss=bc", "?", "3", "0.5000", "0.6500", "0.7000", "g0", "i1",
                              "0.200", "-", "-", "12.5"]
  assert lines[3].split() == ["loss=rwbc", "?", "2", "0.5000", "0.5500", "0.5500", "g0", "i1",
                              "0.200", "-", "-", "8.0"]
  assert lines[4] == f"wrote {out_png}"
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert compare.resolve_workdirs([os.path.join(root, "loss=bc")]) == [
      os.path.join(root, "loss=bc")]
  assert main.main(["compare", str(tmp_path / "nothing")]) == 2
  assert "has not finished" in capsys.readouterr().err


def test_sweep_seeds_axis_names_and_bad_values(tmp_path, capsys):
  root = str(tmp_path / "sw")
  argv = ["sweep", "--root", root, "--gin_file", "a.gin", "--dry-run",
          "--sweep", "improve/config.TrainConfig.loss='bc','gold'"]
  assert main.main(argv + ["--seeds", "2"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line for line in out if line.startswith("#")] == [
      "# loss=bc,seed=0", "# loss=bc,seed=1", "# loss=gold,seed=0", "# loss=gold,seed=1"]
  assert "loss=bc,seed=1 --gin_file a.gin" in out[3]
  assert out[3].endswith(" --gin.config.RunConfig.seed=1")
  assert main.main(argv[:6] + ["--seeds", "3"]) == 0  # --seeds alone is a sweep.
  assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")] == [
      "# seed=0", "# seed=1", "# seed=2"]
  for bad in ("0", "-2", "1.5", "three"):
    assert main.main(argv + ["--seeds", bad]) == 2
    assert f"--seeds {bad!r} must be a whole number >= 1" in capsys.readouterr().err
  assert main.main(argv[:6] + ["--sweep", "config.RunConfig.seed=1,2", "--seeds", "2"]) == 2
  assert "both set the seed" in capsys.readouterr().err


def test_compare_seed_groups_means_and_intervals(tmp_path, capsys):
  root = str(tmp_path / "sw")
  # loss=bc: 3 seeds with test metrics; loss=rwbc: 2 seeds, one without test metrics (so the
  # group reports validation); loss=gold: one seed.
  _finish(os.path.join(root, "loss=bc,seed=0"), [0.3, 0.9], 1.0, test=[0.2, 0.5])
  _finish(os.path.join(root, "loss=bc,seed=1"), [0.3, 0.9], 1.0, test=[0.4, 0.6])
  _finish(os.path.join(root, "loss=bc,seed=2"), [0.3, 0.9], 1.0, test=[0.3, 0.7])
  _finish(os.path.join(root, "loss=rwbc,seed=0"), [0.4, 0.4], 1.0, test=[0.1, 0.1])
  _finish(os.path.join(root, "loss=rwbc,seed=1"), [0.5, 0.5], 1.0)
  _finish(os.path.join(root, "loss=gold,seed=0"), [0.2, 0.25], 1.0, test=[0.2, 0.3])
  names = ["loss=bc,seed=0", "loss=bc,seed=1", "loss=bc,seed=2", "loss=rwbc,seed=0",
           "loss=rwbc,seed=1", "loss=gold,seed=0"]
  with open(os.path.join(root, sweep.SWEEP_FILE), "w") as f:
    json.dump({"runs": [{"name": n, "workdir": os.path.join(root, n)} for n in names]}, f)
  out_png = str(tmp_path / "cmp.png")
  assert main.main(["compare", root, "--out", out_png]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[3].split()[-2:] == ["0.5000", "1.0"]  # The final test reward of each run ...
  assert lines[7].split()[-2:] == ["-", "1.0"]  # ... or "-" without one.
  table = lines[lines.index("") + 1:-1]
  assert table[1].split() == ["group", "phase", "metric", "n", "mean", "se", "95%", "low", "95%",
                              "high"]
  # By hand. loss=bc final test [0.5, 0.6, 0.7]: mean 0.6, sd 0.1, se 0.1 / sqrt(3) = 0.057735;
  # t(0.975, df=2) = 4.302653 -> half width 0.248414. BC test [0.2, 0.4, 0.3]: the same spread.
  # loss=rwbc validation [0.4, 0.5]: mean 0.45, se 0.05, t(0.975, df=1) = 12.706205 -> 0.635310.
  assert [line.split() for line in table[3:]] == [
      ["loss=bc", "BC", "test", "3", "0.3000", "0.0577", "0.0516", "0.5484"],
      ["loss=bc", "g0", "i1", "test", "3", "0.6000", "0.0577", "0.3516", "0.8484"],
      ["loss=rwbc", "BC", "validation", "2", "0.4500", "0.0500", "-0.1853", "1.0853"],
      ["loss=rwbc", "g0", "i1", "validation", "2", "0.4500", "0.0500", "-0.1853", "1.0853"],
      ["loss=gold", "BC", "test", "1", "0.2000", "-", "-", "-"],
      ["loss=gold", "g0", "i1", "test", "1", "0.3000", "-", "-", "-"]]
  stats = compare.interval([0.5, 0.6, 0.7])
  assert stats["se"] == pytest.approx(0.1 / 3 ** 0.5)
  assert (stats["low"], stats["high"]) == pytest.approx((0.6 - 0.248414, 0.6 + 0.248414), abs=1e-6)
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_groups_by_recorded_config_without_seed(tmp_path, capsys):
  base = {"task": "arith", "seed": 0, "improve": {"lr_decay": 0.5}}
  _finish(str(tmp_path / "first"), [0.1, 0.2], 1.0, config=base)
  _finish(str(tmp_path / "second"), [0.3, 0.4], 1.0, config=dict(base, seed=7))
  _finish(str(tmp_path / "other"), [0.5, 0.6], 1.0, config=dict(base, improve={"lr_decay": 1}))
  _finish(str(tmp_path / "seed=1"), [0.5, 0.6], 1.0)  # No recorded config: grouped by name.
  _finish(str(tmp_path / "seed=2"), [0.7, 0.8], 1.0)
  workdirs = [str(tmp_path / n) for n in ("first", "second", "other", "seed=1", "seed=2")]
  assert compare.seed_groups(workdirs) == {"first": ["first", "second"], "other": ["other"],
                                           "runs": ["seed=1", "seed=2"]}
  assert main.main(["compare", *workdirs[:3]]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[out.index("") + 4].split() == ["first", "BC", "validation", "2", "0.2000", "0.1000",
                                            "-1.0706", "1.4706"]
  assert main.main(["compare", workdirs[2], workdirs[3]]) == 0  # No seed group: no seed table.
  assert "" not in capsys.readouterr().out.splitlines()


def _fake_run(workdir, config):
  """A fabricated finished run with a BC phase (checkpoint, marker) and a Grow step 1."""
  _finish(workdir, [0.5, 0.6], 1.0, config=config)
  for rel, text in (("checkpoints/bc/100/params", "bc params"), ("grow/g001/chunk-0", "samples"),
                    ("grow/g001/COMPLETED", ""), ("checkpoints/g001_i01/1/params", "improved"),
                    ("phases/g001_i01.json", "{}")):
    os.makedirs(os.path.dirname(os.path.join(workdir, rel)), exist_ok=True)
    with open(os.path.join(workdir, rel), "w") as f:
      f.write(text)
  with open(os.path.join(workdir, "phases", "bc.json"), "w") as f:
    json.dump({"phase": "bc", "eval_reward": 0.5, "eval_exact_match": 0.1}, f)


def test_sweep_share_grow_starts_later_variants_from_the_first_of_their_seed(tmp_path,
                                                                              monkeypatch):
  root = str(tmp_path)
  executed = []

  def call(cmd):
    workdir = cmd[cmd.index("--workdir") + 1]
    executed.append(os.path.basename(workdir))
    if "loss=bc" in workdir:  # The first run of each seed: runs fully.
      _fake_run(workdir, {"seed": int(workdir[-1]), "improve": {"loss": "bc"}})
    return 0

  monkeypatch.setattr(launchers.subprocess, "call", call)
  argv = ["sweep", "--root", root, "--gin_file", "a.gin", "--share_grow", "--seeds", "2",
          "--sweep", "improve/config.TrainConfig.loss='bc','gold'"]
  assert main.main(argv) == 0
  assert executed == ["loss=bc,seed=0", "loss=bc,seed=1", "loss=gold,seed=0", "loss=gold,seed=1"]
  for seed in (0, 1):
    source, target = (os.path.join(root, f"loss={loss},seed={seed}") for loss in ("bc", "gold"))
    for rel in ("checkpoints/bc/100/params", "grow/g001/chunk-0", "grow/g001/COMPLETED"):
      assert open(os.path.join(target, rel)).read() == open(os.path.join(source, rel)).read()
    assert (json.load(open(os.path.join(target, "phases", "bc.json"))) ==
            json.load(open(os.path.join(source, "phases", "bc.json"))))
    # Improve's results are the variant's own: never copied.
    assert not os.path.exists(os.path.join(target, "checkpoints", "g001_i01"))
    assert not os.path.exists(os.path.join(target, "phases", "g001_i01.json"))
    shared = json.load(open(os.path.join(target, "shared_from.json")))
    assert shared["source"] == source and shared["run_config"]["seed"] == seed
  with pytest.raises(RestJaxError, match="launcher local"):
    sweep.run_sweep(sweep.plan(root, ["a.gin"], [], [sweep.parse_axis("x.y=1,2")]),
                    launcher="slurm", opts=None, dry_run=True, share_grow=True)


def test_shared_workdir_accepts_improve_only_changes_and_refuses_others(tmp_path):
  import dataclasses

  from rest_jax.config import GrowConfig, ImproveConfig, RunConfig, SamplingConfig, TrainConfig
  from rest_jax.pipeline import run as pipeline_run
  from rest_jax.pipeline.workdir import Workdir

  source = Workdir(str(tmp_path / "source"))
  base = RunConfig(seed=1)
  _fake_run(source.root, json.loads(json.dumps(dataclasses.asdict(base))))
  target = Workdir(str(tmp_path / "target"))
  assert target.shared_differences(base) is None  # Not shared.
  target.share_from(source)
  with pytest.raises(RestJaxError, match="already holds a run"):
    target.share_from(source)
  other_loss = dataclasses.replace(base, num_improve_steps=3, improve=ImproveConfig(
      train=TrainConfig(loss="gold"), thresholds=(0.9,)))
  assert target.shared_differences(other_loss) == (source.root, [])
  pipeline_run.check_workdir(target, other_loss)
  more_samples = dataclasses.replace(
      other_loss, grow=GrowConfig(sampling=SamplingConfig(num_samples=8)))
  assert target.shared_differences(more_samples)[1] == [
      "grow.sampling.num_samples: 4 in the workdir, 8 now"]
  for changed in (more_samples, dataclasses.replace(base, seed=2)):
    with pytest.raises(RestJaxError, match="starts from the BC phase and Grow step 1 of"):
      pipeline_run.check_workdir(target, changed)
  with pytest.raises(RestJaxError, match="no finished BC phase"):
    Workdir(str(tmp_path / "t2")).share_from(Workdir(str(tmp_path / "missing")))
