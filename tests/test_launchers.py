"""Launchers: every --dry-run prints exactly the command lines it would execute."""

import os
import shlex
import subprocess
import sys

import pytest

from rest_jax.cli import launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--gin_file", "gin/pods/wmt_base_v5e_4x4.gin", "--gin_file", "tasks/my task.gin",
          "--workdir", "gs://bucket/run 1", "--gin.config.RunConfig.task='wmt x'",
          "--gin.config.SamplingConfig.num_samples", "8"]
RUN_ARGV = ["rest-jax", "run", "--workdir", "gs://bucket/run 1",
            "--gin_file", "gin/pods/wmt_base_v5e_4x4.gin", "--gin_file", "tasks/my task.gin",
            "--gin.config.RunConfig.task='wmt x'", "--gin.config.SamplingConfig.num_samples=8"]
RUN_LINE = ("rest-jax run --workdir 'gs://bucket/run 1' --gin_file gin/pods/wmt_base_v5e_4x4.gin "
            "--gin_file 'tasks/my task.gin' '--gin.config.RunConfig.task='\"'\"'wmt x'\"'\"'' "
            "--gin.config.SamplingConfig.num_samples=8")


def _dry_run(launcher, extra, capsys):
  assert launchers.main(launcher, COMMON + extra + ["--dry-run"]) == 0
  return capsys.readouterr().out


def test_local(capsys):
  out = _dry_run("local", [], capsys)
  assert out == f"env JAX_PLATFORMS=cpu {RUN_LINE}\n"
  assert shlex.split(out) == ["env", "JAX_PLATFORMS=cpu"] + RUN_ARGV


def test_tpu_pod(capsys):
  out = _dry_run("tpu", ["--tpu", "pod-1", "--zone", "us-east5-b", "--project", "p",
                         "--ref", "v0.1"], capsys)
  argv = shlex.split(out)
  assert argv[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-east5-b",
                       "--project=p", "--worker=all", argv[9]]
  assert len(argv) == 10
  steps = argv[9][len("--command="):].split(" && ")
  assert steps[:5] == [
      "(test -d rest_jax || git clone -q https://github.com/rest-jax/rest_jax.git rest_jax)",
      "cd rest_jax", "git fetch -q origin", "git checkout -q v0.1", "pip install -q -e '.[tpu]'"]
  assert steps[5] == RUN_LINE and shlex.split(steps[5]) == RUN_ARGV


def test_xpk(capsys):
  out = _dry_run("xpk", ["--cluster", "c1", "--workload", "rest-1", "--tpu_type", "v5litepod-256",
                         "--docker_image", "gcr.io/p/rest:1", "--zone", "z"], capsys)
  assert out == ("xpk workload create --cluster=c1 --workload=rest-1 --tpu-type=v5litepod-256 "
                 "--num-slices=1 --docker-image=gcr.io/p/rest:1 --zone=z "
                 + shlex.quote(f"--command={RUN_LINE}") + "\n")
  assert shlex.split(shlex.split(out)[-1][len("--command="):]) == RUN_ARGV
  gpu = _dry_run("xpk", ["--cluster", "c1", "--workload", "g", "--device_type", "h100-80gb-8",
                         "--num_nodes", "4", "--docker_image", "img"], capsys)
  assert "--device-type=h100-80gb-8 --num-nodes=4 --num-slices=1" in gpu


def _slurm_dry_run(extra, capsys):
  shared = [a.replace("gs://bucket", "/shared") for a in COMMON]  # sbatch needs a shared path.
  assert launchers.main("slurm", shared + extra + ["--dry-run"]) == 0
  return capsys.readouterr().out.replace("/shared/run 1", "gs://bucket/run 1")


def test_slurm(capsys):
  out = _slurm_dry_run(["--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu",
                        "--explicit_coordinator"], capsys)
  script = out.split("\n")
  assert script[0] == "# write gs://bucket/run 1/launch.sbatch:"
  assert script[1:12] == [
      "#!/bin/bash", "#SBATCH --job-name=rest-jax", "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=24:00:00",
      "#SBATCH --output=gs://bucket/run 1/slurm-%j.out",
      "#SBATCH --signal=TERM@120",  # The run saves and exits 75 (docs/multihost.md).
      "#SBATCH --partition=gpu", "set -euo pipefail", "mkdir -p 'gs://bucket/run 1'"]
  assert script[12] == ('export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                        '| head -n1):12355"')
  srun = shlex.split(script[13])
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "bash"] and srun[3] == "-c"
  # What each task's shell runs, with its own SLURM variables.
  assert srun[4] == (f'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID" {RUN_LINE} --coordinator_address '
                     '"$COORDINATOR" --num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID"')
  assert script[14:] == ["# end of gs://bucket/run 1/launch.sbatch",
                         "sbatch 'gs://bucket/run 1/launch.sbatch'", ""]
  per_node = _slurm_dry_run(["--per", "node", "--signal_before_s", "0"], capsys)
  assert "#SBATCH --ntasks-per-node=1" in per_node and "CUDA_VISIBLE" not in per_node
  assert "--signal" not in per_node
  assert "srun --kill-on-bad-exit=1 bash -c " + shlex.quote(RUN_LINE) in per_node
  # A gs:// workdir: sbatch could neither read the script nor write the log there.
  assert launchers.main("slurm", COMMON + ["--dry-run"]) == 2
  assert "--launcher slurm needs a workdir on the cluster's shared file system" in \
      capsys.readouterr().err


def test_slurm_script_runs_in_bash(tmp_path):
  """The srun line, run by bash with a fake srun, gives each task exactly the run's argv."""
  workdir = str(tmp_path / "w d")
  opts = launchers.parse_options("slurm", ["--nodes", "1", "--gpus_per_node", "2",
                                           "--explicit_coordinator"])
  run = launchers.RunSpec(("a.gin",), workdir, ("config.RunConfig.task='a b'",))
  script = launchers.slurm_script(run, opts)
  fakes = tmp_path / "bin"
  fakes.mkdir()
  (fakes / "srun").write_text('#!/bin/bash\nshift\nSLURM_PROCID=1 SLURM_LOCALID=1 "$@"\n')
  (fakes / "scontrol").write_text("#!/bin/bash\necho node7\necho node8\n")
  (fakes / "rest-jax").write_text('#!/bin/bash\nprintf "%s\\n" "CUDA=$CUDA_VISIBLE_DEVICES" "$@"\n')
  for f in fakes.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f"{fakes}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[7-8]",
             SLURM_NTASKS="2")
  out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == ["CUDA=1", "run", "--workdir", workdir, "--gin_file", "a.gin",
                 "--gin.config.RunConfig.task='a b'", "--coordinator_address", "node7:12355",
                 "--num_processes", "2", "--process_id", "1"]
  assert os.path.isdir(workdir)


def test_errors(capsys):
  assert launchers.main("xpk", ["--gin_file", "a.gin", "--workdir", "w", "--dry-run"]) == 2
  assert "required: --cluster, --workload, --docker_image" in capsys.readouterr().err
  assert launchers.main("local", ["--workdir", "w", "--dry-run"]) == 2
  assert "at least one --gin_file" in capsys.readouterr().err
  assert launchers.main("xpk", COMMON + ["--cluster", "c", "--workload", "w", "--docker_image",
                                         "i", "--dry-run"]) == 2
  assert "exactly one of --tpu_type" in capsys.readouterr().err
  assert launchers.main("tpu", COMMON + ["--tpu", "t", "--zone", "z", "--bogus", "--dry-run"]) == 2
  assert "does not take ['--bogus']" in capsys.readouterr().err
  with pytest.raises(launchers.RestJaxError, match="NAME=VALUE"):
    launchers.RunSpec(("a.gin",), "w", ("novalue",))


def test_script_entry_point():
  """launch/tpu.py is a thin wrapper: same output as launchers.main, from any directory."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), *COMMON,
                        "--tpu", "t", "--zone", "z", "--dry-run"], capture_output=True,
                       text=True, check=True, cwd="/").stdout
  run = launchers.RunSpec(tuple(COMMON[1:4:2]), COMMON[5], ("config.RunConfig.task='wmt x'",
                                                            "config.SamplingConfig.num_samples=8"))
  opts = launchers.parse_options("tpu", ["--tpu", "t", "--zone", "z"])
  assert out == launchers.describe("tpu", run, opts) + "\n"
  assert out.startswith("gcloud compute tpus tpu-vm ssh t --zone=z --worker=all ")
