"""What a run shows: logs, TensorBoard scalars, summary.json and report plots (host 0 only)."""

from __future__ import annotations

import io
import re
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rest_jax import storage
from rest_jax.pipeline.workdir import Workdir

logger = logging.getLogger("rest_jax")

MONITOR_NOISE_SIGMAS = 2.0  # The auto tolerance: this many standard errors of the difference.
ROW_KEYS = ("phase", "grow_step", "improve_step", "threshold", "train_examples", "eval_reward",
            "eval_exact_match")


TEST_KEYS = ("test_reward", "test_exact_match", "test_independent", "test_independent_se")
# Pass@k and diversity of sampled test answers (rest_jax.diversity), when they are on.
SAMPLED_TEST_KEYS = re.compile(r"test_(pass@\d+|distinct_\d+(_se)?|sample_reward)")
# Cost counters of every row (rest_jax.online.cost): cumulative over the run up to the phase.
COST_KEYS = ("samples_drawn", "sampled_tokens", "trained_tokens", "flops")
# The test-set diversity the monitor watches next to the independent metric: distinct-2, or
# distinct-1 where the answers have no bigram (e.g. one-number answers).
DIVERSITY_KEYS = ("test_distinct_2", "test_distinct_1")


def diversity_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
  """The first of ``DIVERSITY_KEYS`` that some row has (None: no sampled test answers)."""
  return next((k for k in DIVERSITY_KEYS if any(r.get(k) is not None for r in rows)), None)


def summary_row(*, phase: str, grow_step: int, improve_step: int, threshold: float | None,
                train_examples: int, eval_reward: float, eval_exact_match: float,
                eval_independent: float | None = None,
                independent_metric: str | None = None,
                eval_independent_se: float | None = None,
                test: Mapping[str, float] | None = None,
                cost: Mapping[str, float] | None = None) -> dict:
  """One row of ``summary.json`` (the shape tools rely on).

  "eval_*" are the validation split's metrics (what every selection used). With the
  reward-hacking monitor on, the row also has "eval_independent" (the independent metric's mean
  on D_eval), "eval_independent_se" (the standard error of that mean over the eval set) and
  "independent_metric" (its name). With a test split, ``test`` adds "test_reward",
  "test_exact_match" (and "test_independent"): the phase's chosen params evaluated once on the
  test split, which nothing selects on; with ``EvalConfig.num_test_samples`` also
  "test_pass@k", "test_distinct_1/2" (and "_se") and "test_sample_reward". ``cost`` adds the
  run's cumulative "samples_drawn", "sampled_tokens", "trained_tokens" and "flops".
  """
  row = {"phase": phase, "grow_step": int(grow_step), "improve_step": int(improve_step),
         "threshold": None if threshold is None else float(threshold),
         "train_examples": int(train_examples), "eval_reward": float(eval_reward),
         "eval_exact_match": float(eval_exact_match)}
  if eval_independent is not None:
    row.update(eval_independent=float(eval_independent), independent_metric=independent_metric)
    if eval_independent_se is not None:
      row["eval_independent_se"] = float(eval_independent_se)
  unknown = {k for k in (test or {})
             if k not in TEST_KEYS and not SAMPLED_TEST_KEYS.fullmatch(k)}
  unknown |= set(cost or {}) - set(COST_KEYS)
  if unknown:
    raise ValueError(f"summary_row: unknown test metrics {sorted(unknown)}; use {TEST_KEYS}.")
  row.update({k: float(v) for k, v in (test or {}).items()})
  row.update({k: float(v) for k, v in (cost or {}).items()})
  return row


def _label(row: Mapping[str, Any]) -> str:
  return "BC" if row["phase"] == "bc" else f"g{row['grow_step']} i{row['improve_step']}"


def monitor_tolerance(a: Mapping[str, Any], b: Mapping[str, Any], setting: float = -1.0,
                      se_key: str = "eval_independent_se") -> float:
  """How far a watched metric may fall from row ``a`` to ``b`` before it counts.

  ``setting`` >= 0 is used as is; < 0 (auto) gives MONITOR_NOISE_SIGMAS x sqrt(se_a^2 + se_b^2),
  the eval-set noise of the difference of the two means (``se_key``: the rows' standard error
  of the metric; rows without it count as noiseless).
  """
  if setting >= 0:
    return float(setting)
  se_a, se_b = (float(r.get(se_key) or 0.0) for r in (a, b))
  return float(MONITOR_NOISE_SIGMAS * np.hypot(se_a, se_b))


def _drops(rows: Sequence[Mapping[str, Any]], key: str, tolerance: float,
           name: Callable[[Mapping[str, Any]], str]) -> list[dict]:
  """Consecutive rows (of those with ``key``) where eval_reward rose and ``key`` fell by more
  than its tolerance (its standard error: ``key + "_se"``)."""
  rows = [r for r in rows if r.get(key) is not None]
  events = []
  for a, b in zip(rows, rows[1:]):
    d_reward = b["eval_reward"] - a["eval_reward"]
    d_metric = b[key] - a[key]
    tol = monitor_tolerance(a, b, tolerance, se_key=key + "_se")
    if d_reward > 0 and d_metric < -tol:
      events.append({"from": _label(a), "to": _label(b), "reward_change": float(d_reward),
                     "metric_change": float(d_metric), "metric": name(b), "tolerance": tol})
  return events


def reward_hacking_events(rows: Sequence[Mapping[str, Any]], tolerance: float = -1.0
                          ) -> list[dict]:
  """Consecutive phases where the eval reward rose while the independent metric, or the test
  samples' diversity (``diversity_key``: distinct-2, else distinct-1), fell by more than the
  tolerance (``monitor_tolerance``; < 0: auto, from the eval noise).

  Returns:
    one dict per such pair: {"from", "to" (phase labels), "reward_change", "metric_change",
    "metric" (the independent metric's name, or the diversity key), "tolerance"}; rows without
    the metric are skipped.
  """
  key = diversity_key(rows)
  return (_drops(rows, "eval_independent", tolerance, lambda r: r.get("independent_metric"))
          + (_drops(rows, key, tolerance, lambda r: key) if key else []))


def watched(rows: Sequence[Mapping[str, Any]]) -> bool:
  """Whether the monitor has anything to watch (an independent metric or test diversity)."""
  return diversity_key(rows) is not None or any(r.get("eval_independent") is not None
                                                for r in rows)


def describe_tolerance(setting: float) -> str:
  """The monitor's tolerance in words, for the summary and the plot."""
  if setting >= 0:
    return f"a drop of more than {setting:g}"
  return f"a drop of more than {MONITOR_NOISE_SIGMAS:g} standard errors (eval-set noise)"


class _Scalars:
  """TensorBoard scalars written in the caller's thread (tensorboardX's ``EventsWriter``).

  tensorboardX's ``SummaryWriter`` writes from a background thread: when a write fails there
  (a full disk), the thread dies, its queue fills and the next ``add_scalar`` blocks forever, so
  the run hangs. Here a failed write is an error where it happens (a full disk: one
  RestJaxError). Flushed every ``flush_s`` seconds and on close (on ``gs://`` a flush uploads
  the file).
  """

  def __init__(self, logdir: str, flush_s: float = 30.0):
    from tensorboardX import event_file_writer, record_writer  # Deferred: a slow import.
    from tensorboardX import summary as tb_summary
    from tensorboardX.proto import event_pb2
    self._event, self._scalar = event_pb2.Event, tb_summary.scalar
    self.logdir, self.flush_s, self._flushed = logdir, flush_s, time.time()
    with storage.user_errors(logdir, writing=True):
      record_writer.directory_check(logdir)
      self._writer = event_file_writer.EventsWriter(storage.join(logdir, "events"))

  def add(self, tag: str, value: float, step: int) -> None:
    with storage.user_errors(self.logdir, writing=True):
      self._writer.write_event(self._event(wall_time=time.time(), step=step,
                                           summary=self._scalar(tag, value)))
      if time.time() - self._flushed > self.flush_s:
        self._writer.flush()
        self._flushed = time.time()

  def close(self) -> None:
    with storage.user_errors(self.logdir, writing=True):
      self._writer.close()


class Reporter:
  """TensorBoard scalars and the end-of-run report; does nothing on hosts other than 0."""

  def __init__(self, workdir: Workdir, *, enabled: bool = True, monitor_tolerance: float = -1.0):
    self.workdir = workdir
    self.enabled = enabled
    self.monitor_tolerance = monitor_tolerance
    self._writer: _Scalars | None = None

  def _tb(self) -> _Scalars | None:
    if self._writer is None and self.enabled:
      self._writer = _Scalars(self.workdir.tb_dir)
    return self._writer

  def scalars(self, tag_prefix: str, step: int, values: Mapping[str, float]) -> None:
    """Writes scalar values under ``tag_prefix/name`` at ``step``."""
    writer = self._tb()
    if writer is None:
      return
    for name, value in values.items():
      if np.ndim(value) == 0:
        writer.add(f"{tag_prefix}/{name}", float(value), step)

  def summary(self, rows: Sequence[dict], wall_time_s: float) -> dict:
    """The summary dict: rows, wall time and, with the monitor on, "reward_hacking" (the
    ``reward_hacking_events``), "reward_hacking_suspected" and "reward_hacking_tolerance"."""
    summary = {"rows": list(rows), "wall_time_s": float(wall_time_s)}
    if watched(rows):
      events = reward_hacking_events(rows, self.monitor_tolerance)
      summary.update(reward_hacking=events, reward_hacking_suspected=bool(events),
                     reward_hacking_tolerance=describe_tolerance(self.monitor_tolerance))
    return summary

  def write_summary(self, rows: Sequence[dict], wall_time_s: float) -> dict:
    """Writes summary.json (``summary``), logs each monitor event as a WARNING; returns it."""
    summary = self.summary(rows, wall_time_s)
    if not self.enabled:
      return summary
    for e in summary.get("reward_hacking", ()):
      logger.warning("possible reward hacking from %s to %s: eval reward %+.4f while the "
                     "independent metric %s changed %+.4f (tolerance %.4f)", e["from"], e["to"],
                     e["reward_change"], e["metric"], e["metric_change"], e["tolerance"])
    storage.write_json(self.workdir.summary_path, summary)
    return summary

  def write_plots(self, rows: Sequence[dict], grow_stats: Mapping[int, dict],
                  thresholds: Mapping[int, Sequence[float]]) -> list[str]:
    """Writes ``report/eval_reward.png`` and ``report/grow_g{g}_rewards.png``; returns the paths."""
    if not self.enabled:
      return []
    import matplotlib  # Deferred: only the report needs it.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = self.workdir.report_dir
    paths = []
    labels = ["BC" if r["phase"] == "bc" else f"g{r['grow_step']} i{r['improve_step']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.5))
    x = np.arange(len(rows))
    ax.plot(x, [r["eval_reward"] for r in rows], "o-", label="eval reward")
    ax.plot(x, [r["eval_exact_match"] for r in rows], "s--", label="eval exact match")
    if any(r.get("test_reward") is not None for r in rows):
      ax.plot(x, [r.get("test_reward", np.nan) for r in rows], "D-", label="test reward")
    if any(r.get("eval_independent") is not None for r in rows):
      metric = next(r["independent_metric"] for r in rows if r.get("eval_independent") is not None)
      ax.plot(x, [r.get("eval_independent", np.nan) for r in rows], "^-.",
              label=f"independent: {metric}")
    key = diversity_key(rows)
    if key:
      ax.plot(x, [r.get(key, np.nan) for r in rows], "v:", label=f"test distinct-{key[-1]}")
    for n, e in enumerate(reward_hacking_events(rows, self.monitor_tolerance)):
      ax.axvspan(labels.index(e["to"]) - 1, labels.index(e["to"]), color="C3", alpha=0.12,
                 label=None if n else f"possible reward hacking: {e['metric']} fell by more "
                 "than its tolerance while the reward rose")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out score")
    ax.set_title("Eval across BC, Grow (g) and Improve (i) steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(storage.join(out_dir, "eval_reward.png"))
    save_figure(fig, paths[-1])
    for g, stats in sorted(grow_stats.items()):
      hist = stats["histogram"]
      edges = np.asarray(hist["edges"])
      fig, ax = plt.subplots(figsize=(5.5, 3.5))
      ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", alpha=0.7,
             label="samples")
      ax.axvline(stats["mean"], color="k", ls=":", label=f"mean {stats['mean']:.3f}")
      for i, tau in enumerate(thresholds.get(g, ()), start=1):
        ax.axvline(tau, color="C3", alpha=0.5 + 0.5 * i / max(1, len(thresholds[g])),
                   label=f"tau_{i} = {tau:.3f}")
      ax.set_xlabel("reward")
      ax.set_ylabel("samples")
      ax.set_title(f"Grow step {g}: reward of {stats['num_samples']} samples")
      ax.legend(fontsize=7)
      fig.tight_layout()
      paths.append(storage.join(out_dir, f"grow_g{g:03d}_rewards.png"))
      save_figure(fig, paths[-1])
    return paths

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def save_figure(fig: Any, path: str) -> None:
  """Writes a matplotlib figure as PNG through ``storage`` (any path kind) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())


def _cell(value: float | None, width: int, digits: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_table(rows: Sequence[dict], tolerance: float = -1.0) -> str:
  """A plain-text table of summary rows: validation reward and exact match; with the monitor
  on, the independent metric, carrying "!" where the monitor flags the phase; then (when any
  row has them) test reward and exact match ("-" where a row has none), and with sampled test
  answers pass@1, pass@N and distinct-2 (distinct-1 where answers have no bigram), with "!"
  where the monitor flags a diversity drop."""
  metric = next((r.get("independent_metric") for r in rows
                 if r.get("eval_independent") is not None), None)
  events = reward_hacking_events(rows, tolerance)
  key = diversity_key(rows)
  flagged = {e["to"] for e in events if e["metric"] not in DIVERSITY_KEYS}
  less_diverse = {e["to"] for e in events if e["metric"] in DIVERSITY_KEYS}
  test = any(r.get("test_reward") is not None for r in rows)
  pass_n = max((int(k[10:]) for r in rows for k in r if k.startswith("test_pass@")), default=0)
  head = f"{'phase':8} {'g':>2} {'i':>2} {'tau':>6} {'examples':>9} {'reward':>7} {'exact':>6}"
  if metric:
    head += f" {metric[:8]:>9}"
  head += f" {'test':>7} {'t.exact':>7}" if test else ""
  dist = f"dist{key[-1]}" if key else "dist"
  head += f" {'pass@1':>7} {f'pass@{pass_n}':>8} {dist:>7}" if pass_n else ""
  lines = [head, "-" * len(head)]
  for r in rows:
    tau = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
    line = (f"{r['phase']:8} {r['grow_step']:>2} {r['improve_step']:>2} {tau:>6} "
            f"{r['train_examples']:>9} {r['eval_reward']:>7.4f} {r['eval_exact_match']:>6.3f}")
    if metric:
      flag = "!" if _label(r) in flagged else " "
      line += (f" {r['eval_independent']:>8.4f}{flag}" if r.get("eval_independent") is not None
               else f" {'-':>8} ")
    if test:
      line += f" {_cell(r.get('test_reward'), 7, 4)} {_cell(r.get('test_exact_match'), 7, 3)}"
    if pass_n:
      flag = "!" if _label(r) in less_diverse else " "
      line += (f" {_cell(r.get('test_pass@1'), 7, 3)} {_cell(r.get(f'test_pass@{pass_n}'), 8, 3)}"
               f" {_cell(r.get(key), 6, 3)}{flag}")
    lines.append(line)
  return "\n".join(lines)


def format_result(result: Mapping[str, Any], workdir: str) -> str:
  """What ``rest-jax run`` prints on stdout at the end: the table, the monitor's verdict, where
  the summary and plots are, and the wall time."""
  rows = result["rows"]
  lines = [format_table(rows, result.get("monitor_tolerance", -1.0)), ""]
  if "reward_hacking_suspected" in result:
    metric = next((r["independent_metric"] for r in rows
                   if r.get("eval_independent") is not None), None)
    watching = ([f"independent metric {metric}"] if metric else []) + (
        [f"test distinct-{key[-1]}"] if (key := diversity_key(rows)) else [])
    events = result["reward_hacking"]
    verdict = (f"SUSPECTED at {', '.join(e['to'] for e in events)} (marked !)" if events
               else "not suspected")
    lines.append(f"reward hacking: {verdict}; {' and '.join(watching)}, flagged on "
                 f"{result['reward_hacking_tolerance']} while the reward rises.")
  lines.append(f"summary: {storage.join(workdir, 'summary.json')}; plots: "
               f"{storage.join(workdir, 'report')}; TensorBoard: tensorboard --logdir "
               f"{storage.join(workdir, 'tb')} (pip install -e \".[tensorboard]\")")
  lines.append(f"wall time: {result['wall_time_s']:.0f} s")
  return "\n".join(lines)
