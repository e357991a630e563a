"""Reward-hacking monitor: the independent metric in evaluation, summary rows and the report."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from rest_jax import config as C
from rest_jax.errors import RestJaxError
from rest_jax.evaluation import EvalSet, independent_metric_name, make_eval_fn
from rest_jax.grow.fake import FakeSampler
from rest_jax.evaluation import standard_error
from rest_jax.pipeline.reporting import (Reporter, format_result, format_table,
                                         reward_hacking_events, summary_row)
from rest_jax.pipeline.workdir import Workdir


def _row(phase, g, i, reward, bleu):
  return summary_row(phase=phase, grow_step=g, improve_step=i, threshold=None if g == 0 else 0.9,
                     train_examples=10, eval_reward=reward, eval_exact_match=0.0,
                     eval_independent=bleu, independent_metric="bleu")


ROWS = [_row("bc", 0, 0, 0.70, 0.30), _row("improve", 1, 1, 0.75, 0.35),
        _row("improve", 1, 2, 0.80, 0.28), _row("improve", 2, 1, 0.79, 0.20),
        _row("improve", 2, 2, 0.85, 0.21)]


def test_metric_choice():
  assert independent_metric_name("chrf", "auto") == "bleu"
  assert independent_metric_name("bleu", "auto") == "chrf"
  assert independent_metric_name("exact_match", "auto") == "chrf"
  assert independent_metric_name("my_learned_rm", "auto") == "bleu"
  assert independent_metric_name("chrf", "exact_match") == "exact_match"
  assert independent_metric_name("chrf", "none") is None
  with pytest.raises(RestJaxError, match="is the training reward"):
    independent_metric_name("chrf", "chrf")
  assert C.EvalConfig().independent_metric == "auto"


def test_events_on_fabricated_rows():
  events = reward_hacking_events(ROWS)
  # Reward up and BLEU down only from g1 i1 to g1 i2 (g1 i2 -> g2 i1: both fall).
  assert events == [{"from": "g1 i1", "to": "g1 i2", "reward_change": pytest.approx(0.05),
                     "metric_change": pytest.approx(-0.07), "metric": "bleu",
                     "tolerance": 0.0}]  # Rows without a standard error: no noise.
  plain = [{k: v for k, v in r.items() if k not in ("eval_independent", "independent_metric")}
           for r in ROWS]
  assert reward_hacking_events(plain) == []
  assert set(plain[0]) == set(summary_row(phase="bc", grow_step=0, improve_step=0,
                                          threshold=None, train_examples=1, eval_reward=0.5,
                                          eval_exact_match=0.0))


def test_summary_flag_warning_and_plot(tmp_path, caplog):
  reporter = Reporter(Workdir(str(tmp_path)))
  with caplog.at_level(logging.WARNING, logger="rest_jax"):
    reporter.write_summary(ROWS, 12.0)
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["reward_hacking_suspected"] is True
  assert [(e["from"], e["to"]) for e in summary["reward_hacking"]] == [("g1 i1", "g1 i2")]
  assert summary["rows"][2]["eval_independent"] == 0.28
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "possible reward hacking from g1 i1 to g1 i2" in warnings[0]
  assert reporter.write_plots(ROWS, {}, {}) == [os.path.join(str(tmp_path), "report",
                                                              "eval_reward.png")]
  with open(tmp_path / "report" / "eval_reward.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  healthy = [_row("bc", 0, 0, 0.7, 0.3), _row("improve", 1, 1, 0.8, 0.4)]
  reporter.write_summary(healthy, 1.0)
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["reward_hacking_suspected"] is False and summary["reward_hacking"] == []


class _Vocab:
  def decode(self, ids):
    return " ".join(f"w{i}" for i in ids)


def test_eval_fn_reports_the_independent_metric():
  # FakeSampler's greedy decodes echo the prompts: "w5 w6", "w7 w8", "w9 w9".
  eval_set = EvalSet(inputs=np.asarray([[5, 6], [7, 8], [9, 9]], np.int32),
                     sources=["a", "b", "c"], references=["w5 w6", "w7", "w9 w9"])
  reward = lambda s, h, r: np.asarray([0.5, 0.25, 0.0], np.float32)
  length = lambda s, h, r: np.asarray([len(x) / 10 for x in h], np.float32)
  sampler = FakeSampler()
  metrics = make_eval_fn(sampler=sampler, eval_set=eval_set, reward=reward,
                         vocab=_Vocab(), batch_size=2, independent=length)(None)
  assert sampler.calls["greedy"] == 2  # Batches of 2 and 1 prompts.
  # Hypotheses "w5 w6", "w7 w8", "w9 w9": exact matches 1st and 3rd; lengths 5, 5, 5.
  assert metrics == {"eval_reward": pytest.approx(0.25), "eval_exact_match": pytest.approx(2 / 3),
                     "eval_independent": pytest.approx(0.5), "eval_independent_se": 0.0}
  no_monitor = make_eval_fn(sampler=FakeSampler(), eval_set=eval_set, reward=reward,
                            vocab=_Vocab(), batch_size=3)(None)
  assert set(no_monitor) == {"eval_reward", "eval_exact_match"}


def _noisy(phase, g, i, reward, bleu, se):
  return summary_row(phase=phase, grow_step=g, improve_step=i, threshold=None if g == 0 else 0.9,
                     train_examples=10, eval_reward=reward, eval_exact_match=0.0,
                     eval_independent=bleu, independent_metric="bleu", eval_independent_se=se)


def test_tolerance_ignores_drops_within_eval_noise():
  # The first smoke run's drops (-0.0045, -0.0011) are far inside 2 standard errors.
  rows = [_noisy("bc", 0, 0, 0.175, 0.030, 0.008), _noisy("improve", 1, 1, 0.208, 0.050, 0.010),
          _noisy("improve", 1, 2, 0.231, 0.0455, 0.010),
          _noisy("improve", 2, 1, 0.238, 0.0636, 0.011),
          _noisy("improve", 2, 2, 0.246, 0.0625, 0.011)]
  assert reward_hacking_events(rows) == []
  # A drop beyond the noise is flagged, with the tolerance it exceeded.
  rows[2] = _noisy("improve", 1, 2, 0.231, 0.010, 0.004)
  (event,) = reward_hacking_events(rows)
  assert event["to"] == "g1 i2" and event["tolerance"] == pytest.approx(2 * np.hypot(0.01, 0.004))
  # A fixed tolerance replaces the noise estimate (0: every drop counts).
  assert len(reward_hacking_events(rows, 0.0)) == 2 and reward_hacking_events(rows, 0.5) == []
  # std (ddof 1) of [0, 1, 0, 1] is sqrt(1/3); over sqrt(4) examples.
  assert standard_error(np.asarray([0.0, 1.0, 0.0, 1.0])) == pytest.approx(np.sqrt(1 / 3) / 2)


def test_warning_table_and_legend_agree(tmp_path, caplog):
  rows = [_noisy("bc", 0, 0, 0.70, 0.30, 0.01), _noisy("improve", 1, 1, 0.75, 0.29, 0.01),
          _noisy("improve", 1, 2, 0.80, 0.20, 0.01)]
  reporter = Reporter(Workdir(str(tmp_path)))
  with caplog.at_level(logging.WARNING, logger="rest_jax"):
    summary = reporter.write_summary(rows, 3.0)
  assert [e["to"] for e in summary["reward_hacking"]] == ["g1 i2"]  # -0.01 is noise, -0.09 not.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "g1 i1 to g1 i2" in warnings[0] and "tolerance" in warnings[0]
  table = format_table(rows)
  assert "bleu" in table.splitlines()[0]
  flagged = [line.split()[:3] for line in table.splitlines() if line.endswith("!")]
  assert flagged == [["improve", "1", "2"]]
  text = format_result({**summary, "monitor_tolerance": -1.0}, str(tmp_path))
  assert "SUSPECTED at g1 i2" in text and "standard errors" in text
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  captured = []
  monkey_save = lambda fig, path: captured.append(
      [t.get_text() for t in fig.axes[0].get_legend().get_texts()])
  import rest_jax.pipeline.reporting as reporting  # pylint: disable=g-import-not-at-top
  real = reporting.save_figure
  reporting.save_figure = lambda fig, path: (monkey_save(fig, path), plt.close(fig))
  try:
    reporter.write_plots(rows, {}, {})
  finally:
    reporting.save_figure = real
  assert any("possible reward hacking" in t for t in captured[0])


def test_tensorboard_scalars_are_read_back_and_a_full_disk_is_one_error(tmp_path, monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  reporter = Reporter(Workdir(str(tmp_path / "w")))
  reporter.scalars("train", 3, {"loss": 0.5, "vector": np.zeros(2)})
  reporter.close()
  files = os.listdir(tmp_path / "w" / "tb")
  events = [tf.compat.v1.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(
      str(tmp_path / "w" / "tb" / files[0]))]
  values = [(e.step, v.tag) for e in events for v in e.summary.value]
  assert values == [(3, "train/loss")]  # Scalars only.
  # A full disk: tensorboardX's background writer died silently and the next add_scalar hung
  # forever once its queue filled; now the write that fails is one error naming the folder.
  reporter = Reporter(Workdir(str(tmp_path / "full")))
  reporter.scalars("train", 1, {"loss": 1.0})

  def full(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(record_writer.RecordWriter, "write", full)
  with pytest.raises(RestJaxError, match=r"could not write .*full/tb: no space left on device"):
    for step in range(2, 40):  # More than tensorboardX's queue (10) would have held.
      reporter.scalars("train", step, {"loss": 1.0})
