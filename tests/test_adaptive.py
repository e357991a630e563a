"""Adaptive sampling budgets in Grow: a subset of the fixed-N_max records, the stop rule, batch
size independence, resume after a failure mid-chunk, the budget in stats.json, bad settings."""

import dataclasses

import numpy as np
import pytest

from rest_jax.config import (AdaptiveConfig, GrowConfig, ImproveConfig, OnlineConfig, RunConfig,
                             SamplingConfig)
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.grow.adaptive import run_adaptive_grow
from rest_jax.grow.fake import FakeSampler
from rest_jax.grow.step import run_grow
from rest_jax.rewards import ExactMatch, score
from rest_jax.tasks import BYTE_VOCAB


def _ids(text):
  return np.asarray(BYTE_VOCAB.encode(text) + [1], np.int32)


def _solves(e, k):
  """Whether sample k of example e is correct: some prompts early, some late, some never."""
  return e % 4 != 3 and (e * 5 + k) % (e % 4 + 2) == 0


def _sampler(n):
  return FakeSampler(n, sample_fn=lambda prompt, e, k: BYTE_VOCAB.encode(
      f"a{e}" if _solves(e, k) else f"x{k}"))


def _prompts(ids):
  return [{"inputs": _ids(f"p{i}"), "targets": _ids(f"a{i}"), "inputs_pretokenized": f"p{i}",
           "targets_pretokenized": f"a{i}", "example_id": i} for i in ids]


def _reward(sources, hyps, refs):
  return score(ExactMatch(), "exact_match", sources, hyps, refs)


def _config(n, batch, max_samples=0, k=1, chunk=4):
  return GrowConfig(sampling=SamplingConfig(num_samples=n, batch_size=batch), chunk_size=chunk,
                    adaptive=AdaptiveConfig(max_samples=max_samples, min_passing=k))


def _grow(directory, config, *, adaptive, reward=_reward, prompts=None):
  kw = dict(sampler=_sampler(config.sampling.num_samples), params=None,
            prompts=prompts or _prompts(range(10)), reward=reward, vocab=BYTE_VOCAB,
            writer=growdata.GrowWriter(str(directory)), grow_step=1, seed=0, config=config,
            input_len=8, target_len=8, progress=False)
  if adaptive:
    run_adaptive_grow(threshold=1.0, **kw)
  else:
    run_grow(**kw)
  return list(growdata.read_records(str(directory)))


def _key(r):
  return (r.example_id, r.sample_idx)


def _same(a, b):
  assert a.targets_pretokenized == b.targets_pretokenized and a.reward == b.reward
  np.testing.assert_array_equal(a.targets, b.targets)
  np.testing.assert_array_equal(a.behaviour_logprobs, b.behaviour_logprobs)


@pytest.mark.parametrize("k", [1, 2])
def test_adaptive_records_are_the_fixed_nmax_prefixes_the_stop_rule_keeps(tmp_path, k):
  fixed = {_key(r): r for r in _grow(tmp_path / "fixed", _config(8, 4), adaptive=False)}
  runs = [_grow(tmp_path / f"b{b}", _config(2, b, 8, k), adaptive=True) for b in (2, 3, 4)]
  for records in runs[1:]:  # Independent of the batch size: the same records, the same order.
    assert [_key(r) for r in records] == [_key(r) for r in runs[0]]
    for a, b in zip(records, runs[0]):
      _same(a, b)
  drawn = {}
  for r in runs[0]:
    _same(r, fixed[_key(r)])  # A subset of the fixed-N_max records, identical.
    if not r.is_original:
      drawn.setdefault(r.example_id, []).append(r.sample_idx)
  for e in range(10):
    correct = np.cumsum([_solves(e, s) for s in range(8)])
    # Stop rule: rounds of 2 until k samples pass, else all 8.
    rounds = next((r + 1 for r in range(4) if correct[2 * r + 1] >= k), 4)
    assert drawn[e] == list(range(2 * rounds)), e
  assert len(runs[0]) < len(fixed)


def test_adaptive_budget_in_stats(tmp_path):
  records = [r for r in _grow(tmp_path, _config(2, 4, 8), adaptive=True) if not r.is_original]
  stats = growdata.finalize(str(tmp_path), adaptive=dict(
      threshold=1.0, min_passing=1, max_samples=8, samples_per_round=2))
  budget = stats.adaptive
  assert budget["samples_drawn"] == len(records) == stats.num_samples
  assert budget["fixed_samples"] == 80 and budget["prompts"] == 10
  assert budget["saved_fraction"] == pytest.approx(1 - len(records) / 80)
  solved = {r.example_id for r in records if r.reward == 1.0}
  assert budget["solved_prompts"] == len(solved)
  assert sum(budget["prompts_per_round"]) == 10
  assert growdata.read_stats(str(tmp_path)).adaptive == budget  # Stored in stats.json.


def test_adaptive_grow_resumes_to_the_same_records(tmp_path):
  ref = _grow(tmp_path / "ref", _config(2, 2, 8), adaptive=True)
  calls = []

  def failing(sources, hyps, refs):  # Fails in chunk 1's second round (after p5's original).
    calls.append("p5" in sources)
    if sum(calls) == 3:
      raise RuntimeError("reward server died")
    return _reward(sources, hyps, refs)

  with pytest.raises(RuntimeError):
    _grow(tmp_path / "work", _config(2, 2, 8), adaptive=True, reward=failing)
  assert growdata.GrowWriter(str(tmp_path / "work")).completed_chunks() == {0}
  again = _grow(tmp_path / "work", _config(2, 2, 8), adaptive=True)
  assert [_key(r) for r in again] == [_key(r) for r in ref]
  for a, b in zip(again, ref):
    _same(a, b)


def test_originals_are_written_once(tmp_path):
  config = dataclasses.replace(_config(2, 4, 8), include_originals=True)
  records = _grow(tmp_path, config, adaptive=True)
  originals = [r for r in records if r.is_original]
  assert sorted(r.example_id for r in originals) == list(range(10))


@pytest.mark.parametrize("make, match", [
    (lambda: _config(3, 4, 8), "multiple of SamplingConfig.num_samples"),
    (lambda: _config(4, 4, 4), "at least two rounds"),
    (lambda: _config(2, 4, 8, k=9), "exceeds max_samples"),
    (lambda: AdaptiveConfig(max_samples=-1), "max_samples must be >= 0"),
    (lambda: AdaptiveConfig(threshold=1.5), "threshold must be in"),
    (lambda: RunConfig(algorithm="online", online=OnlineConfig(), grow=_config(2, 4, 8)),
     "for algorithm 'rest'"),
    (lambda: RunConfig(grow=_config(2, 4, 8), improve=ImproveConfig(
        schedule="quantile")).adaptive_threshold, "set AdaptiveConfig.threshold"),
], ids=["round_multiple", "two_rounds", "k_above_nmax", "negative", "threshold_range",
        "online", "auto_threshold"])
def test_impossible_settings_are_one_line_errors(make, match):
  with pytest.raises(RestJaxError, match=match) as e:
    make()
  assert "\n" not in str(e.value)


def test_auto_threshold_is_the_schedules_first():
  grow = _config(2, 4, 8)
  assert RunConfig(grow=grow, improve=ImproveConfig(thresholds=(0.5, 0.9))) \
      .adaptive_threshold == 0.5
  assert RunConfig(grow=dataclasses.replace(grow, adaptive=AdaptiveConfig(
      max_samples=8, threshold=0.25))).adaptive_threshold == 0.25


class _Hosts:
  """Two "hosts" as threads: jax.process_index / process_count and distributed.allgather per
  thread, the gather exchanging arrays at a barrier (every host must call it in lockstep)."""

  def __init__(self, monkeypatch, count=2):
    import threading  # pylint: disable=import-outside-toplevel
    from rest_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
    self.count, self.local = count, threading.local()
    self.barrier, self.slots = threading.Barrier(count, timeout=60), [None] * count
    monkeypatch.setattr("jax.process_index", lambda: self.local.index)
    monkeypatch.setattr("jax.process_count", lambda: count)
    monkeypatch.setattr(distributed, "allgather", self.allgather)

  def allgather(self, x):
    self.slots[self.local.index] = np.asarray(x)
    self.barrier.wait()
    out = np.stack(self.slots)
    self.barrier.wait()
    return out

  def run(self, fn):
    import concurrent.futures  # pylint: disable=import-outside-toplevel

    def host(i):
      self.local.index = i
      return fn(i)

    with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
      return [f.result() for f in [pool.submit(host, i) for i in range(self.count)]]


def test_two_hosts_draw_the_records_of_one(tmp_path, monkeypatch):
  one = _grow(tmp_path / "one", _config(2, 4, 8, k=2), adaptive=True,
              prompts=_prompts(range(13)))
  hosts = _Hosts(monkeypatch)
  shards = [_prompts(range(9)), _prompts(range(9, 13))]  # Unequal shares: 3 and 1 chunks.

  def grow(i):
    return run_adaptive_grow(
        sampler=_sampler(2), params=None, prompts=shards[i], reward=_reward, vocab=BYTE_VOCAB,
        writer=growdata.GrowWriter(str(tmp_path / "two"), host_id=i), grow_step=1, seed=0,
        config=_config(2, 4, 8, k=2), threshold=1.0, input_len=8, target_len=8,
        progress=False)

  assert hosts.run(grow) == [3, 1]  # Chunks written per host (chunk_size 4).
  two = {_key(r): r for r in growdata.read_records(str(tmp_path / "two"))}
  assert sorted(two) == sorted(_key(r) for r in one)
  for r in one:
    _same(r, two[_key(r)])
