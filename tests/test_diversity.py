"""Pass@k (Chen et al. 2021) and distinct-n of sampled test answers, and the monitor on them."""

import itertools
import math

import numpy as np
import pytest

from rest_jax import diversity
from rest_jax.evaluation import EvalSet
from rest_jax.grow.fake import FakeSampler
from rest_jax.pipeline.reporting import (Reporter, format_result, format_table,
                                         reward_hacking_events, summary_row)


def _brute_pass_at_k(n, c, k):
  """Probability that a random k-subset of n samples (c correct) holds a correct one."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 6),
                                   (8, 1, 4), (8, 7, 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
  assert diversity.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
  assert diversity.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_ks_and_bad_k():
  assert diversity.ks_up_to(1) == [1]
  assert diversity.ks_up_to(6) == [1, 2, 4, 6]
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  got = diversity.pass_at_ks(correct)
  assert got[1] == pytest.approx((0.25 + 0 + 1) / 3)
  assert got[4] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="1 <= k <= n"):
    diversity.pass_at_k(4, 1, 5)


def test_distinct_n():
  assert diversity.distinct_n(["a b", "a b", "a b"], 1) == pytest.approx(2 / 6)
  assert diversity.distinct_n(["a b", "c d"], 2) == 1.0
  assert diversity.distinct_n(["x", "y"], 2) is None  # No bigram at all.
  mean, se = diversity.distinct_stats([["a", "a"], ["a", "b"]], 1)
  assert mean == pytest.approx(0.75) and se == pytest.approx(0.25)


class _Vocab:
  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def test_sample_eval_fn_on_a_fake_sampler():
  inputs = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 4, 1]], np.int32)
  eval_set = EvalSet(inputs=inputs, sources=["a", "b", "c"], references=["x", "y", "z"])
  calls = []

  def reward(sources, hypotheses, references):
    calls.append(len(hypotheses))
    return np.array([1.0 if h.startswith("5") else 0.0 for h in hypotheses])

  fn = diversity.make_sample_eval_fn(sampler=FakeSampler(4), eval_set=eval_set, reward=reward,
                                     vocab=_Vocab(), batch_size=2, seed=0)
  metrics = fn(None)
  assert calls == [12]
  assert set(metrics) == {"test_pass@1", "test_pass@2", "test_pass@4", "test_distinct_1",
                          "test_distinct_1_se", "test_distinct_2", "test_distinct_2_se",
                          "test_sample_reward"}
  assert 0.0 <= metrics["test_pass@1"] <= metrics["test_pass@2"] <= metrics["test_pass@4"] <= 1.0
  assert metrics == fn(None)  # The samples are fixed by seed, prompt and sample index.


def _row(i, reward, distinct, se=0.01):
  return summary_row(phase="bc" if i == 0 else "improve", grow_step=min(i, 1), improve_step=i,
                     threshold=None, train_examples=1, eval_reward=reward, eval_exact_match=0.0,
                     test={"test_reward": reward, "test_exact_match": 0.0, "test_pass@1": 0.3,
                           "test_pass@4": 0.6, "test_distinct_2": distinct,
                           "test_distinct_2_se": se})


def test_monitor_flags_a_drop_of_test_diversity():
  rows = [_row(0, 0.5, 0.8), _row(1, 0.6, 0.5), _row(2, 0.7, 0.49)]
  events = reward_hacking_events(rows)
  assert [(e["to"], e["metric"]) for e in events] == [("g1 i1", "test_distinct_2")]
  assert events[0]["tolerance"] == pytest.approx(2 * math.hypot(0.01, 0.01))
  table = format_table(rows)
  assert "pass@4" in table.splitlines()[0] and "dist2" in table.splitlines()[0]
  assert table.splitlines()[3].endswith("!") and not table.splitlines()[4].endswith("!")
  summary = Reporter(None, enabled=False).summary(rows, 1.0)
  assert summary["reward_hacking_suspected"]
  text = format_result({**summary, "monitor_tolerance": -1.0}, "/w")
  assert "SUSPECTED at g1 i1" in text and "test distinct-2" in text
  with pytest.raises(ValueError, match="unknown test metrics"):
    summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None, train_examples=0,
                eval_reward=0.0, eval_exact_match=0.0, test={"test_pass@x": 1.0})


def test_compare_shows_pass_at_k_diversity_and_cost(tmp_path):
  from rest_jax.cli import compare_cost  # pylint: disable=g-import-not-at-top

  rows = [dict(_row(0, 0.5, 0.8), samples_drawn=0, flops=1e9),
          dict(_row(1, 0.6, 0.7), samples_drawn=800, flops=3e9)]
  online = [dict(r, phase="online") for r in rows]
  summaries = {"rest": {"rows": rows}, "online": {"rows": online}}
  assert compare_cost.has_extras(summaries)
  assert not compare_cost.has_extras({"old": {"rows": [{"eval_reward": 0.1}]}})
  table = compare_cost.format_cost_table(summaries).splitlines()
  assert table[1].split() == ["run", "algorithm", "reward", "pass@1", "pass@N", "distinct",
                              "samples", "flops"]
  assert table[3].split() == ["rest", "rest", "0.6000", "0.300", "0.600", "@4", "d2=0.700",
                              "800", "3.00e+09"]
  assert table[4].split()[1] == "online"
  path = compare_cost.plot_cost(summaries, str(tmp_path / "c.png"))
  assert path == str(tmp_path / "c_cost.png") and (tmp_path / "c_cost.png").stat().st_size > 0


def test_one_word_answers_watch_distinct_1():
  # Answers of one word have no bigram: distinct-2 is left out and the monitor falls back to
  # distinct-1 (the share of distinct answers among a prompt's N samples).
  assert diversity.distinct_stats([["12", "12"], ["3", "4"]], 2) is None
  rows = [summary_row(phase="bc" if i == 0 else "improve", grow_step=min(i, 1), improve_step=i,
                      threshold=None, train_examples=1, eval_reward=0.5 + 0.1 * i,
                      eval_exact_match=0.0, test={"test_pass@1": 0.3, "test_pass@2": 0.5,
                                                  "test_distinct_1": d, "test_distinct_1_se": 0.01})
          for i, d in enumerate((0.9, 0.6))]
  assert [e["metric"] for e in reward_hacking_events(rows)] == ["test_distinct_1"]
  assert "dist1" in format_table(rows).splitlines()[0]
