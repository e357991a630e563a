"""Compare runs: their ``summary.json`` files as one table and one plot, and, across runs that
differ only by seed, the mean, standard error and 95% interval per phase.

  rest-jax compare W1 W2 ... [--out compare.png]    # or a sweep root (its sweep.json)

A summary is ``{"rows": [summary_row, ...], "wall_time_s": float}`` (``rest_jax.pipeline.reporting``);
the first row is BC, then one row per Improve step. Runs are grouped by their recorded config
(``run_config.json``) without ``seed``; a run without one by its name without ``seed=N``. A
group's statistics use the test reward, or the validation reward when any run of the group has
no test metrics (test and validation numbers are never mixed in one mean).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping, Sequence

import numpy as np

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.pipeline.reporting import save_figure
from rest_jax.pipeline.workdir import RUN_CONFIG, Workdir
from rest_jax.cli.sweep import SWEEP_FILE

_SEED_IN_NAME = re.compile(r"(^|,)seed=\d+(?=,|$)")
CONFIDENCE = 0.95


def resolve_workdirs(paths: Sequence[str]) -> list[str]:
  """Workdirs to compare: each path itself, or for a sweep root, its runs (from sweep.json)."""
  out = []
  for path in paths:
    manifest = storage.join(path, SWEEP_FILE)
    if not storage.exists(Workdir(path).summary_path) and storage.exists(manifest):
      out += [r["workdir"] for r in storage.read_json(manifest, keys=("runs",))["runs"]]
    else:
      out.append(path)
  return out


def run_labels(workdirs: Sequence[str]) -> dict[str, str]:
  """``{label: workdir}``; the label is the workdir's base name (its sweep run name), or the
  whole path where two base names clash."""
  out: dict[str, str] = {}
  for workdir in workdirs:
    label = os.path.basename(os.path.normpath(workdir)) or workdir
    out[workdir if label in out else label] = workdir
  return out


def load_summaries(workdirs: Sequence[str]) -> dict[str, dict]:
  """``{label: summary}`` (labels as ``run_labels``)."""
  if not workdirs:
    raise RestJaxError("nothing to compare; pass workdirs (or a sweep root) to `rest-jax compare`.")
  out: dict[str, dict] = {}
  for label, workdir in run_labels(workdirs).items():
    wd = Workdir(workdir)
    path = wd.summary_path
    if not storage.exists(path):
      raise RestJaxError(f"{path} does not exist: the run in {workdir} has not finished; finish "
                         "it (rerun its `rest-jax run`) or leave it out.")
    summary = wd.read_summary()  # RestJaxError naming the file if it is corrupt.
    try:
      rows = summary["rows"]
      float(rows[0]["eval_reward"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise RestJaxError(f"{path} is not a rest_jax summary ({e!r}); it needs "
                         '{"rows": [...], "wall_time_s": ...} as reporting.py writes it.') from e
    summary.setdefault("reward", _reward_name(wd))
    out[label] = summary
  return out


def seed_groups(workdirs: Sequence[str]) -> dict[str, list[str]]:
  """``{group name: [labels]}``: runs whose recorded config (without ``seed``) is the same, in
  order of first appearance. The name is the first run's label without ``seed=N``."""
  keys: dict[str, str] = {}
  groups: dict[str, list[str]] = {}
  for label, workdir in run_labels(workdirs).items():
    path = Workdir(workdir).path(RUN_CONFIG)
    bare = _SEED_IN_NAME.sub("", label).strip(",")
    if storage.exists(path):
      config = dict(storage.read_json(path))
      config.pop("seed", None)
      key = "config:" + json.dumps(config, sort_keys=True)
    else:
      key = "name:" + bare
    if key not in keys:
      name, n = bare or "runs", 1
      while name in groups:
        n += 1
        name = f"{bare or 'runs'} #{n}"
      keys[key] = name
      groups[name] = []
    groups[keys[key]].append(label)
  return groups


def _reward_name(wd: Workdir) -> str:
  """The run's RunConfig.reward, from its run_config.json ("?" if unreadable)."""
  try:
    return str(storage.read_json(wd.path(RUN_CONFIG))["reward"])
  except (RestJaxError, OSError, KeyError, TypeError, ValueError):
    return "?"


def _phase(row: Mapping) -> str:
  return "BC" if row["phase"] == "bc" else f"g{row['grow_step']} i{row['improve_step']}"


def interval(values: Sequence[float]) -> dict[str, float]:
  """Mean, standard error (sample std / sqrt(n)) and the 95% t-interval of ``values`` [n].

  With one value the standard error and the interval are NaN (nothing to estimate them from).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  x = np.asarray(values, dtype=np.float64)
  n, mean = len(x), float(np.mean(x))
  if n < 2:
    return {"n": n, "mean": mean, "se": math.nan, "low": math.nan, "high": math.nan}
  se = float(np.std(x, ddof=1) / math.sqrt(n))
  half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * se
  return {"n": n, "mean": mean, "se": se, "low": mean - half, "high": mean + half}


def reported_metric(rows_of_runs: Sequence[Sequence[Mapping]]) -> str:
  """"test_reward" when every row of every run has it, else "eval_reward" (validation)."""
  has_test = all(r.get("test_reward") is not None for rows in rows_of_runs for r in rows)
  return "test_reward" if has_test else "eval_reward"


def seed_statistics(summaries: Mapping[str, dict],
                    groups: Mapping[str, Sequence[str]]) -> list[dict]:
  """Per group and phase (in run order): {"group", "phase", "metric" ("test" or "validation"),
  "n", "mean", "se", "low", "high"} over the group's runs that reached the phase."""
  out = []
  for group, labels in groups.items():
    runs = [summaries[label]["rows"] for label in labels]
    metric = reported_metric(runs)
    phases = [_phase(r) for r in max(runs, key=len)]
    for phase in phases:
      values = [r[metric] for rows in runs for r in rows if _phase(r) == phase]
      out.append({"group": group, "phase": phase,
                  "metric": "test" if metric == "test_reward" else "validation",
                  **interval(values)})
  return out


def _number(value: float, width: int) -> str:
  return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.4f}"


def format_seed_statistics(statistics: Sequence[Mapping]) -> str:
  """The table of ``seed_statistics``: one line per group and phase."""
  width = max(len("group"), *(len(s["group"]) for s in statistics))
  head = (f"{'group':{width}} {'phase':>8} {'metric':>10} {'n':>3} {'mean':>7} {'se':>7} "
          f"{'95% low':>8} {'95% high':>8}")
  lines = [f"across seeds: mean, standard error and {CONFIDENCE:.0%} t-interval of the test "
           "reward (validation where a run has no test metrics)", head, "-" * len(head)]
  for s in statistics:
    lines.append(f"{s['group']:{width}} {s['phase']:>8} {s['metric']:>10} {s['n']:>3} "
                 f"{s['mean']:>7.4f} {_number(s['se'], 7)} {_number(s['low'], 8)} "
                 f"{_number(s['high'], 8)}")
  return "\n".join(lines)


def format_comparison(summaries: Mapping[str, dict]) -> str:
  """One line per run: its reward, the BC, final and best validation reward (and where), the
  final exact match, the final independent metric (the reward-hacking monitor) and the final
  test reward ("-" without a test split)."""
  width = max(len("run"), *(len(k) for k in summaries))
  rwidth = max(len("reward"), *(len(str(s.get("reward", "?"))) for s in summaries.values()))
  head = (f"{'run':{width}} {'reward':{rwidth}} {'phases':>6} {'bc':>7} {'final':>7} "
          f"{'best':>7} {'best at':>8} {'exact':>6} {'monitor':>14} {'test':>7} {'wall s':>8}")
  lines = ["validation (D_eval) mean of each run's own reward, greedy decodes; exact: exact "
           "match; monitor: the independent metric, final phase; test: final phase on the test "
           "split", head, "-" * len(head)]
  for label, summary in summaries.items():
    rows = summary["rows"]
    best = max(rows, key=lambda r: r["eval_reward"])
    last = rows[-1]
    monitor = (f"{last.get('independent_metric')} {last['eval_independent']:.4f}"
               if last.get("eval_independent") is not None else "-")
    test = last.get("test_reward")
    lines.append(f"{label:{width}} {str(summary.get('reward', '?')):{rwidth}} {len(rows):>6} "
                 f"{rows[0]['eval_reward']:>7.4f} {last['eval_reward']:>7.4f} "
                 f"{best['eval_reward']:>7.4f} {_phase(best):>8} {last['eval_exact_match']:>6.3f} "
                 f"{monitor:>14} {_number(math.nan if test is None else test, 7)} "
                 f"{summary.get('wall_time_s', 0.0):>8.1f}")
  return "\n".join(lines)


def plot_comparison(summaries: Mapping[str, dict], out: str,
                    groups: Mapping[str, Sequence[str]] | None = None) -> str:
  """Reward per phase (BC, g1 i1, ...), one line per group of runs that differ only by seed:
  a group of several runs is drawn as its mean with the 95% interval as a band; a single run as
  its line. Test reward where every run has it, else validation. Writes a PNG to ``out``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = groups or {label: [label] for label in summaries}
  statistics = seed_statistics(summaries, groups)
  # Every run's phases in order of first appearance (runs of other algorithms add theirs).
  longest = list(dict.fromkeys(_phase(r) for s in summaries.values() for r in s["rows"]))
  fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(longest) + 3), 4))
  for group, labels in groups.items():
    points = [s for s in statistics if s["group"] == group]
    x = [longest.index(s["phase"]) for s in points]
    mean = [s["mean"] for s in points]
    label = group if len(labels) == 1 else f"{group} (n={len(labels)}, {CONFIDENCE:.0%} CI)"
    line, = ax.plot(x, mean, "o-", label=label)
    if len(labels) > 1:
      ax.fill_between(x, [s["low"] for s in points], [s["high"] for s in points],
                      color=line.get_color(), alpha=0.2)
  kinds = {s["metric"] for s in statistics}
  ax.set_xticks(range(len(longest)), longest)
  rewards = ", ".join(sorted({str(s.get("reward", "?")) for s in summaries.values()}))
  ax.set_ylabel(f"{kinds.pop()} reward ({rewards})" if len(kinds) == 1 else
                f"test reward, validation where missing ({rewards})")
  ax.set_title("Reward across BC, Grow (g) and Improve (i) steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, out)
  return out
