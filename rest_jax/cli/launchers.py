"""Launchers: the same `rest-jax run` on a laptop, a TPU pod, GKE (xpk) or a SLURM GPU cluster.

A launcher only passes gin files, a workdir and ``--gin.X=V`` overrides (``RunSpec``); the run
itself is the same command everywhere. Multi-host setup is the run's business: on TPU VMs and
under SLURM ``rest-jax run`` detects its coordinator, process count and id
(``jax.distributed``), so the TPU and xpk launchers add nothing; the SLURM one can also pass
them from SLURM's variables (``--explicit_coordinator``).

Each launcher is a function ``RunSpec, options -> list of argv`` (argv lists, quoted with
``shlex.join`` when printed), so ``--dry-run`` prints exactly what would execute. This module
imports neither jax nor gin: the scripts in ``launch/`` run on a machine without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from rest_jax import storage
from rest_jax.errors import RestJaxError

COORDINATOR_PORT = 12355


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One ``rest-jax run``: gin files, a workdir and ``NAME=VALUE`` gin overrides."""

  gin_files: tuple[str, ...]
  workdir: str
  overrides: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.gin_files:
      raise RestJaxError("a launch needs at least one --gin_file.")
    if not self.workdir:
      raise RestJaxError("a launch needs a --workdir (on storage every host can reach).")
    for o in self.overrides:
      if "=" not in o:
        raise RestJaxError(f"override {o!r} is not NAME=VALUE; write it as --gin.NAME=VALUE.")

  def argv(self, program: Sequence[str] = ("rest-jax",)) -> list[str]:
    """``rest-jax run --workdir W --gin_file F ... --gin.X=V ...``."""
    out = [*program, "run", "--workdir", self.workdir]
    for f in self.gin_files:
      out += ["--gin_file", f]
    return out + [f"--gin.{o}" for o in self.overrides]


# -- The launchers ---------------------------------------------------------------------------


def local_commands(run: RunSpec, opts: argparse.Namespace) -> list[list[str]]:
  """This machine, CPU only: ``env JAX_PLATFORMS=cpu rest-jax run ...``."""
  del opts
  return [["env", "JAX_PLATFORMS=cpu", *run.argv()]]


def tpu_commands(run: RunSpec, opts: argparse.Namespace) -> list[list[str]]:
  """Every worker of a TPU VM slice: install rest_jax[tpu] at ``opts.ref``, run the same command."""
  remote = " && ".join([
      f"(test -d rest_jax || git clone -q {shlex.quote(opts.repo)} rest_jax)",
      "cd rest_jax", "git fetch -q origin", f"git checkout -q {shlex.quote(opts.ref)}",
      "pip install -q -e '.[tpu]'", shlex.join(run.argv()),
  ])
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", opts.tpu, f"--zone={opts.zone}"]
  if opts.project:
    cmd.append(f"--project={opts.project}")
  return [cmd + ["--worker=all", f"--command={remote}"]]


def xpk_commands(run: RunSpec, opts: argparse.Namespace) -> list[list[str]]:
  """A GKE JobSet through xpk: one container per host, the same command in each."""
  cmd = ["xpk", "workload", "create", f"--cluster={opts.cluster}", f"--workload={opts.workload}"]
  if opts.tpu_type:
    cmd.append(f"--tpu-type={opts.tpu_type}")
  else:
    cmd += [f"--device-type={opts.device_type}", f"--num-nodes={opts.num_nodes}"]
  cmd += [f"--num-slices={opts.num_slices}", f"--docker-image={opts.docker_image}"]
  cmd += [f"--{k}={v}" for k, v in (("project", opts.project), ("zone", opts.zone)) if v]
  return [cmd + [f"--command={shlex.join(run.argv())}"]]


def slurm_script(run: RunSpec, opts: argparse.Namespace) -> str:
  """An sbatch script: ``srun`` starts one process per node or per GPU on every node."""
  if not storage.is_local(run.workdir):
    raise RestJaxError(f"--launcher slurm needs a workdir on the cluster's shared file system "
                       f"(sbatch reads its script and writes its log there), not {run.workdir}; "
                       "pass a shared path, or launch gs:// workdirs on TPU VMs or with xpk.")
  per_gpu = opts.per == "gpu"
  lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --nodes={opts.nodes}",
           f"#SBATCH --ntasks-per-node={opts.gpus_per_node if per_gpu else 1}",
           f"#SBATCH --gpus-per-node={opts.gpus_per_node}", f"#SBATCH --time={opts.time}",
           f"#SBATCH --output={os.path.join(run.workdir, 'slurm-%j.out')}"]
  if opts.signal_before_s > 0:  # The tasks (not the batch shell) get SIGTERM before the limit.
    lines.append(f"#SBATCH --signal=TERM@{opts.signal_before_s}")
  if opts.partition:
    lines.append(f"#SBATCH --partition={opts.partition}")
  lines += ["set -euo pipefail", f"mkdir -p {shlex.quote(run.workdir)}"]
  command = shlex.join(run.argv())
  if per_gpu:  # Each task drives the GPU of its local rank.
    command = f'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID" {command}'
  if opts.explicit_coordinator:
    lines.append('export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
                 f':{COORDINATOR_PORT}"')
    command += (' --coordinator_address "$COORDINATOR" --num_processes "$SLURM_NTASKS"'
                ' --process_id "$SLURM_PROCID"')
  # bash -c so that $SLURM_PROCID is read by each task, not once by the batch shell.
  lines.append(f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(command)}")
  return "\n".join(lines) + "\n"


def slurm_commands(run: RunSpec, opts: argparse.Namespace) -> list[list[str]]:
  """``sbatch`` reading the script from stdin is awkward to print; the script is written to
  ``<workdir>/launch.sbatch`` (by ``execute``) and submitted."""
  del opts
  return [["sbatch", os.path.join(run.workdir, "launch.sbatch")]]


class _Parser(argparse.ArgumentParser):
  """argparse that raises RestJaxError instead of exiting."""

  def error(self, message):
    raise RestJaxError(f"{self.prog}: {message}; see `python {self.prog}.py -h`.")


def _add_local(p: argparse.ArgumentParser) -> None:
  del p


def _add_tpu(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tpu", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--repo", default="https://github.com/rest-jax/rest_jax.git",
                 help="git URL each worker clones (once) into ~/rest_jax")
  p.add_argument("--ref", default="main", help="git commit/branch/tag to check out")


def _add_xpk(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cluster", required=True)
  p.add_argument("--workload", required=True, help="workload name (lowercase, <= 40 chars)")
  p.add_argument("--tpu_type", default="", help="e.g. v5litepod-256 (or use --device_type)")
  p.add_argument("--device_type", default="", help="GPU nodes, e.g. h100-80gb-8")
  p.add_argument("--num_nodes", type=int, default=1, help="GPU nodes (with --device_type)")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--docker_image", required=True, help="image with rest_jax installed")
  p.add_argument("--project", default="")
  p.add_argument("--zone", default="")


def _add_slurm(p: argparse.ArgumentParser) -> None:
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--per", choices=("gpu", "node"), default="gpu",
                 help="one process per GPU (default) or one per node seeing all its GPUs")
  p.add_argument("--partition", default="")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--signal_before_s", type=int, default=120,
                 help="SIGTERM every task this many seconds before the time limit (#SBATCH "
                      "--signal): the run saves, exits 75 and resumes when resubmitted; 0: off")
  p.add_argument("--job_name", default="rest-jax")
  p.add_argument("--explicit_coordinator", action="store_true",
                 help="pass --coordinator_address/--num_processes/--process_id from SLURM's "
                      "variables instead of relying on jax's SLURM auto-detection")


LAUNCHERS: dict[str, tuple[Callable, Callable]] = {
    "local": (_add_local, local_commands),
    "tpu": (_add_tpu, tpu_commands),
    "xpk": (_add_xpk, xpk_commands),
    "slurm": (_add_slurm, slurm_commands),
}


def parse_options(launcher: str, argv: Sequence[str]) -> argparse.Namespace:
  """The launcher's own options (e.g. ``--tpu``, ``--zone``); user errors raise RestJaxError."""
  if launcher not in LAUNCHERS:
    raise RestJaxError(f"unknown launcher {launcher!r}; choose one of {sorted(LAUNCHERS)}.")
  parser = _Parser(prog=f"launch/{launcher}")
  LAUNCHERS[launcher][0](parser)
  opts, unknown = parser.parse_known_args(list(argv))
  if unknown:
    raise RestJaxError(f"launcher {launcher!r} does not take {unknown}; see "
                       f"`python launch/{launcher}.py -h`.")
  if launcher == "xpk" and bool(opts.tpu_type) == bool(opts.device_type):
    raise RestJaxError("xpk launcher: give exactly one of --tpu_type (TPU slices) or "
                       "--device_type (GPU nodes).")
  return opts


def commands(launcher: str, run: RunSpec, opts: argparse.Namespace) -> list[list[str]]:
  return LAUNCHERS[launcher][1](run, opts)


def describe(launcher: str, run: RunSpec, opts: argparse.Namespace) -> str:
  """Exactly what ``execute`` would do, as shell text (files written, then commands)."""
  out = []
  if launcher == "slurm":
    path = storage.join(run.workdir, "launch.sbatch")
    out.append(f"# write {path}:\n{slurm_script(run, opts)}# end of {path}")
  out += [shlex.join(c) for c in commands(launcher, run, opts)]
  return "\n".join(out)


def execute(launcher: str, run: RunSpec, opts: argparse.Namespace) -> None:
  """Runs the launcher's commands one after another; a failing command raises RestJaxError."""
  if launcher == "slurm":
    storage.write_text(storage.join(run.workdir, "launch.sbatch"), slurm_script(run, opts))
  for cmd in commands(launcher, run, opts):
    code = subprocess.call(cmd)
    if code:
      raise RestJaxError(f"`{shlex.join(cmd)}` exited with status {code}; read its output "
                         "above, fix the cause and rerun (runs resume).")


def split_gin_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls ``--gin.NAME=VALUE`` (or ``--gin.NAME VALUE``) out of argv: (rest, [NAME=VALUE])."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if not arg.startswith("--gin."):
      rest.append(arg)
      continue
    body = arg[len("--gin."):]
    if "=" not in body:
      value = next(it, None)
      if value is None:
        raise RestJaxError(f"flag {arg} has no value; write it as --gin.NAME=VALUE.")
      body = f"{body}={value}"
    overrides.append(body)
  return rest, overrides


def main(launcher: str, argv: Sequence[str] | None = None) -> int:
  """``launch/<launcher>.py``: ``--gin_file F ... --workdir W [--gin.X=V ...] [--dry-run]``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = split_gin_overrides(argv)
    parser = _Parser(prog=f"launch/{launcher}", add_help=False)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print exactly what would execute, run nothing")
    if "-h" in rest or "--help" in rest:
      LAUNCHERS[launcher][0](parser)
      parser.print_help()
      return 0
    args, launcher_argv = parser.parse_known_args(rest)
    run = RunSpec(tuple(args.gin_file), args.workdir, tuple(overrides))
    opts = parse_options(launcher, launcher_argv)
    if args.dry_run:
      print(describe(launcher, run, opts))
    else:
      execute(launcher, run, opts)
  except RestJaxError as e:
    print(f"launch/{launcher}.py: error: {e}", file=sys.stderr)
    return 2
  return 0
