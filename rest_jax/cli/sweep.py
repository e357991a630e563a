"""Sweeps: gin bindings with several values -> one run per combination, each in its own workdir.

  rest-jax sweep --root R --gin_file F --sweep config.SamplingConfig.num_samples=2,4,8 \\
      --sweep "improve/config.TrainConfig.loss='bc','reward_weighted_bc'"

expands to the cartesian product (first ``--sweep`` varies slowest), names each run from the
short binding names and values (``num_samples=4,loss=bc``), and puts it in ``R/<name>``.
``--seeds K`` adds a last (fastest) axis ``config.RunConfig.seed = 0, ..., K-1``: run names end
in ``seed=0``, ``seed=1``, ... and ``rest-jax compare R`` reports each setting's mean and 95%
interval across them.
``--share_grow`` (local launcher) runs, per seed, the first run fully and starts the others from
a copy of its BC phase and first Grow step (``Workdir.share_from``): for sweeps over Improve-only
bindings (the loss, thresholds, Improve's optimizer), every variant then improves the same BC
policy on the same Grow set, and BC and Grow are computed once per seed. A run whose config
changes what BC or Grow read refuses to start (``pipeline.run.check_workdir``).
Runs are launched one after another with a launcher (``rest_jax.cli.launchers``); locally, a run
whose workdir says ``done`` is skipped and an unfinished one resumes. ``R/sweep.json`` lists the
runs (for ``rest-jax compare R``). This module imports neither jax nor gin.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from typing import Callable, Sequence

from rest_jax import storage
from rest_jax.cli import launchers
from rest_jax.errors import RestJaxError
from rest_jax.cli.launchers import RunSpec
from rest_jax.pipeline.workdir import RUN_CONFIG, Workdir

SWEEP_FILE = "sweep.json"
SEED_BINDING = "config.RunConfig.seed"


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept binding: a gin name and its values (gin literals, e.g. ``4`` or ``'bc'``)."""

  binding: str
  values: tuple[str, ...]


def split_values(text: str) -> list[str]:
  """Splits ``a,b,c`` on top-level commas (not inside quotes, [] () or {})."""
  out, depth, quote, current = [], 0, "", []
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "[({":
      depth += 1
    elif ch in "])}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append("".join(current).strip())
      current = []
      continue
    current.append(ch)
  out.append("".join(current).strip())
  return out


def parse_axis(spec: str) -> Axis:
  """``"config.SamplingConfig.num_samples=2,4,8"`` -> Axis(binding, ("2", "4", "8"))."""
  if "=" not in spec:
    raise RestJaxError(f"--sweep {spec!r} is not NAME=V1,V2,...; e.g. "
                       "--sweep config.SamplingConfig.num_samples=2,4,8.")
  binding, text = (s.strip() for s in spec.split("=", 1))
  values = split_values(text)
  if not binding or not all(values):
    raise RestJaxError(f"--sweep {spec!r} has an empty name or value; write NAME=V1,V2,...")
  if len(set(values)) != len(values):
    raise RestJaxError(f"--sweep {spec!r} repeats a value; list each value once.")
  return Axis(binding, tuple(values))


def seed_axis(text: str) -> Axis:
  """``--seeds K`` -> the axis ``config.RunConfig.seed = 0, 1, ..., K-1``."""
  try:
    count = int(text)
  except (TypeError, ValueError):
    count = 0
  if count < 1 or str(text).strip() != str(count):
    raise RestJaxError(f"--seeds {text!r} must be a whole number >= 1 (how many seeds to run: "
                       "--seeds 3 runs seeds 0, 1 and 2).")
  return Axis(SEED_BINDING, tuple(str(seed) for seed in range(count)))


def with_seeds(axes: Sequence[Axis], seeds: str | None) -> list[Axis]:
  """``axes`` plus, with ``--seeds``, the seed axis last (so seeds vary fastest)."""
  if seeds is None:
    return list(axes)
  if any(a.binding.rsplit("/", 1)[-1] == SEED_BINDING for a in axes):
    raise RestJaxError(f"--seeds and --sweep {SEED_BINDING}=... both set the seed; keep one.")
  return [*axes, seed_axis(seeds)]


def short_names(bindings: Sequence[str]) -> list[str]:
  """Readable, unique names for bindings: the parameter (``num_samples``), else scope and
  parameter (``improve.learning_rate``), else the whole binding."""
  if len(set(bindings)) != len(bindings):
    raise RestJaxError(f"a binding is swept twice in {list(bindings)}; give each one --sweep.")

  def levels(b: str) -> list[str]:
    scope = b.rsplit("/", 1)[0] if "/" in b else ""
    last = b.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return [last, f"{scope}.{last}" if scope else last, b]

  for level in range(3):
    names = [levels(b)[level] for b in bindings]
    if len(set(names)) == len(names):
      return names
  return list(bindings)


def _safe(text: str) -> str:
  """A filesystem-safe rendering of a gin value: quotes dropped, other odd characters -> _."""
  text = text.replace("'", "").replace('"', "")
  return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_.") or "_"


def expand(axes: Sequence[Axis]) -> list[tuple[str, tuple[str, ...]]]:
  """The cartesian product: ``[(run name, ("binding=value", ...))]``, first axis slowest."""
  names = short_names([a.binding for a in axes])
  runs = []
  for combo in itertools.product(*(a.values for a in axes)):
    label = ",".join(f"{_safe(n)}={_safe(v)}" for n, v in zip(names, combo))
    runs.append((label, tuple(f"{a.binding}={v}" for a, v in zip(axes, combo))))
  if len({name for name, _ in runs}) != len(runs):
    raise RestJaxError("two sweep runs get the same directory name (values that differ only in "
                       "characters replaced by _); choose values that differ in letters/digits.")
  return runs


def plan(root: str, gin_files: Sequence[str], overrides: Sequence[str],
         axes: Sequence[Axis]) -> list[tuple[str, RunSpec]]:
  """``[(name, RunSpec)]``: every combination's run under ``root/<name>``; sweep values come
  after the fixed ``overrides`` (so they win)."""
  if not axes:
    raise RestJaxError("no --sweep or --seeds given; e.g. --sweep "
                       "config.SamplingConfig.num_samples=2,4, or --seeds 3.")
  return [(name, RunSpec(tuple(gin_files), storage.join(root, name),
                         tuple(overrides) + swept)) for name, swept in expand(axes)]


def write_manifest(root: str, runs: Sequence[tuple[str, RunSpec]]) -> str:
  """Adds the runs to ``root/sweep.json`` (earlier entries of other names are kept)."""
  path = storage.join(root, SWEEP_FILE)
  entries = {}
  if storage.exists(path):
    entries = {e["name"]: e for e in storage.read_json(path, keys=("runs",))["runs"]}
  for name, run in runs:
    entries[name] = {"name": name, "workdir": run.workdir, "gin_files": list(run.gin_files),
                     "overrides": list(run.overrides)}
  storage.write_json(path, {"runs": list(entries.values())})
  return path


def per_run_options(launcher: str, opts: argparse.Namespace, index: int) -> argparse.Namespace:
  """Cluster job names must differ per run: xpk workload / SLURM job name get ``-<index>``."""
  values = dict(vars(opts))
  if launcher == "xpk":
    values["workload"] = f"{opts.workload}-{index}"
  elif launcher == "slurm":
    values["job_name"] = f"{opts.job_name}-{index}"
  return argparse.Namespace(**values)


def _seed_of(run: RunSpec) -> str:
  """The run's last ``config.RunConfig.seed`` override ("" without one)."""
  seeds = [o.split("=", 1)[1].strip() for o in run.overrides
           if o.split("=", 1)[0].strip().rsplit("/", 1)[-1] == SEED_BINDING]
  return seeds[-1] if seeds else ""


def share_sources(runs: Sequence[tuple[str, RunSpec]]) -> dict[str, tuple[str, RunSpec]]:
  """``{name: (source name, source run)}`` for ``--share_grow``: every run that is not the first
  of its seed starts from the first run of its seed."""
  first: dict[str, tuple[str, RunSpec]] = {}
  out = {}
  for name, run in runs:
    seed = _seed_of(run)
    if seed in first:
      out[name] = first[seed]
    else:
      first[seed] = (name, run)
  return out


def _share(name: str, run: RunSpec, source: tuple[str, RunSpec], dry_run: bool,
           echo: Callable[[str], None]) -> None:
  """Starts ``run``'s new workdir from its source's BC phase and Grow step 1."""
  target, origin = Workdir(run.workdir), Workdir(source[1].workdir)
  if storage.exists(target.path(RUN_CONFIG)) or storage.exists(target.marker_path("bc")):
    return  # Started before (shared or not): the run resumes.
  echo(f"# {name}: starts from the BC phase and Grow step 1 of {source[0]}")
  if dry_run:
    return
  if not origin.is_finished():
    raise RestJaxError(f"{source[0]} ({origin.root}) has not finished, so {name} cannot start "
                       "from its BC and Grow (--share_grow); rerun the sweep once it has.")
  target.share_from(origin)


def run_sweep(runs: Sequence[tuple[str, RunSpec]], *, launcher: str, opts: argparse.Namespace,
              dry_run: bool, echo: Callable[[str], None] = print,
              share_grow: bool = False) -> list[str]:
  """Launches (or with ``dry_run`` prints) every run in order; returns the names launched.

  With the local launcher a finished run is skipped; an unfinished one resumes. With
  ``share_grow`` (local launcher only) a run that is not the first of its seed starts from a
  copy of that run's BC phase and Grow step 1.
  """
  if share_grow and launcher != "local":
    raise RestJaxError(f"--share_grow copies finished runs before the next starts, which needs "
                       f"--launcher local (not {launcher}); drop --share_grow.")
  sources = share_sources(runs) if share_grow else {}
  launched = []
  for index, (name, run) in enumerate(runs):
    if launcher == "local" and Workdir(run.workdir).is_finished():
      echo(f"# {name}: finished, skipped")
      continue
    if name in sources:
      _share(name, run, sources[name], dry_run, echo)
    run_opts = per_run_options(launcher, opts, index)
    echo(f"# {name}")
    if dry_run:
      echo(launchers.describe(launcher, run, run_opts))
    else:
      launchers.execute(launcher, run, run_opts)
    launched.append(name)
  return launched
