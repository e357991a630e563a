"""``rest-jax compare``'s cost and diversity view: per run, the final phase's test pass@k and
distinct-2 and the samples / FLOPs spent (``rest_jax.online.cost``), and a plot of the reward
against samples drawn and against FLOPs (ReST, semi-online and online on one axis)."""

from __future__ import annotations

import os
from typing import Mapping

from rest_jax.pipeline.reporting import diversity_key, save_figure


def _metric(rows: list[dict]) -> str:
  return "test_reward" if all(r.get("test_reward") is not None for r in rows) else "eval_reward"


def has_extras(summaries: Mapping[str, dict]) -> bool:
  """Whether any row of any run has pass@k / diversity or cost counts."""
  return any("test_pass@1" in r or "samples_drawn" in r
             for s in summaries.values() for r in s["rows"])


def _cell(value, width: int, fmt: str) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def format_cost_table(summaries: Mapping[str, dict]) -> str:
  """One line per run, its final row: test pass@1, pass@N (largest k), distinct-n (``d2=``
  distinct-2, or ``d1=`` distinct-1 where answers have no bigram), samples drawn, FLOPs and
  the reported reward (test, else validation)."""
  width = max(len("run"), *(len(k) for k in summaries))
  head = (f"{'run':{width}} {'algorithm':>11} {'reward':>7} {'pass@1':>7} {'pass@N':>10} "
          f"{'distinct':>8} {'samples':>9} {'flops':>9}")
  lines = ["final phase: reported reward (test, else validation), test pass@k and distinct-n "
           "of sampled answers, cumulative samples drawn and FLOPs", head, "-" * len(head)]
  for label, summary in summaries.items():
    rows = summary["rows"]
    last = rows[-1]
    ks = sorted(int(k[10:]) for k in last if k.startswith("test_pass@"))
    pass_n = f"{last[f'test_pass@{ks[-1]}']:.3f} @{ks[-1]}" if ks else None
    key = diversity_key([last])
    distinct = f"d{key[-1]}={last[key]:.3f}" if key else None
    algorithm = last["phase"] if last["phase"] in ("online", "semi_online") else "rest"
    lines.append(f"{label:{width}} {algorithm:>11} {last[_metric(rows)]:>7.4f} "
                 f"{_cell(last.get('test_pass@1'), 7, '.3f')} {_cell(pass_n, 10, '')} "
                 f"{_cell(distinct, 8, '')} "
                 f"{_cell(last.get('samples_drawn'), 9, '.0f')} "
                 f"{_cell(last.get('flops'), 9, '.2e')}")
  return "\n".join(lines)


def plot_cost(summaries: Mapping[str, dict], out: str) -> str | None:
  """Reward (test, else validation) against samples drawn and against FLOPs, one line per run;
  written next to ``out`` as ``{stem}_cost.png``. None when no run counted its cost."""
  runs = {k: s["rows"] for k, s in summaries.items()
          if all(r.get("samples_drawn") is not None for r in s["rows"])}
  if not runs:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, rows in runs.items():
    metric = _metric(rows)
    for ax, key in zip(axes, ("samples_drawn", "flops")):
      ax.plot([r[key] for r in rows], [r[metric] for r in rows], "o-", label=label)
  metrics = {_metric(rows) for rows in runs.values()}
  for ax, key in zip(axes, ("samples drawn", "FLOPs (2 x params x sampled + 6 x params x "
                                             "trained tokens)")):
    ax.set_xlabel(key)
    ax.set_ylabel("test reward" if metrics == {"test_reward"} else "reward (test / validation)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle("Reward against samples drawn and compute")
  fig.tight_layout()
  stem, _ = os.path.splitext(out)
  path = f"{stem}_cost.png"
  save_figure(fig, path)
  return path
