"""Compare runs: their ``summary.json`` files as one table and one plot.

  rest-jax compare W1 W2 ... [--out compare.png]    # or a sweep root (its sweep.json)

A summary is ``{"rows": [summary_row, ...], "wall_time_s": float}`` (``rest_jax.pipeline.reporting``);
the first row is BC, then one row per Improve step.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.pipeline.reporting import save_figure
from rest_jax.pipeline.workdir import RUN_CONFIG, Workdir
from rest_jax.cli.sweep import SWEEP_FILE


def resolve_workdirs(paths: Sequence[str]) -> list[str]:
  """Workdirs to compare: each path itself, or for a sweep root, its runs (from sweep.json)."""
  out = []
  for path in paths:
    manifest = storage.join(path, SWEEP_FILE)
    if not storage.exists(Workdir(path).summary_path) and storage.exists(manifest):
      out += [r["workdir"] for r in storage.read_json(manifest)["runs"]]
    else:
      out.append(path)
  return out


def load_summaries(workdirs: Sequence[str]) -> dict[str, dict]:
  """``{label: summary}``; the label is the workdir's base name (its sweep run name)."""
  if not workdirs:
    raise RestJaxError("nothing to compare; pass workdirs (or a sweep root) to `rest-jax compare`.")
  out: dict[str, dict] = {}
  for workdir in workdirs:
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
    label = os.path.basename(os.path.normpath(workdir)) or workdir
    if label in out:
      label = workdir
    out[label] = summary
  return out


def _reward_name(wd: Workdir) -> str:
  """The run's RunConfig.reward, from its run_config.json ("?" if unreadable)."""
  try:
    return str(storage.read_json(wd.path(RUN_CONFIG))["reward"])
  except (RestJaxError, OSError, KeyError, TypeError, ValueError):
    return "?"


def _phase(row: Mapping) -> str:
  return "BC" if row["phase"] == "bc" else f"g{row['grow_step']} i{row['improve_step']}"


def format_comparison(summaries: Mapping[str, dict]) -> str:
  """One line per run: its reward, the BC, final and best held-out reward (and where), the final
  exact match and the final independent metric (the reward-hacking monitor)."""
  width = max(len("run"), *(len(k) for k in summaries))
  rwidth = max(len("reward"), *(len(str(s.get("reward", "?"))) for s in summaries.values()))
  head = (f"{'run':{width}} {'reward':{rwidth}} {'phases':>6} {'bc':>7} {'final':>7} "
          f"{'best':>7} {'best at':>8} {'exact':>6} {'monitor':>14} {'wall s':>8}")
  lines = ["held-out (D_eval) mean of each run's own reward, greedy decodes; exact: exact match; "
           "monitor: the independent metric, final phase", head, "-" * len(head)]
  for label, summary in summaries.items():
    rows = summary["rows"]
    best = max(rows, key=lambda r: r["eval_reward"])
    last = rows[-1]
    monitor = (f"{last.get('independent_metric')} {last['eval_independent']:.4f}"
               if last.get("eval_independent") is not None else "-")
    lines.append(f"{label:{width}} {str(summary.get('reward', '?')):{rwidth}} {len(rows):>6} "
                 f"{rows[0]['eval_reward']:>7.4f} {last['eval_reward']:>7.4f} "
                 f"{best['eval_reward']:>7.4f} {_phase(best):>8} {last['eval_exact_match']:>6.3f} "
                 f"{monitor:>14} {summary.get('wall_time_s', 0.0):>8.1f}")
  return "\n".join(lines)


def plot_comparison(summaries: Mapping[str, dict], out: str) -> str:
  """Held-out reward per phase (BC, g0 i1, ...), one line per run; writes a PNG to ``out``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  longest = max(summaries.values(), key=lambda s: len(s["rows"]))["rows"]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(longest) + 3), 4))
  for label, summary in summaries.items():
    rows = summary["rows"]
    ax.plot(range(len(rows)), [r["eval_reward"] for r in rows], "o-", label=label)
  ax.set_xticks(range(len(longest)), [_phase(r) for r in longest])
  rewards = sorted({str(s.get("reward", "?")) for s in summaries.values()})
  ax.set_ylabel(f"held-out reward ({', '.join(rewards)})")
  ax.set_title("Eval reward across BC, Grow (g) and Improve (i) steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, out)
  return out
