"""The Grow step against a fake sampler: records, rewards, originals, unlabeled prompts, resume,
SIGTERM."""

import os
import signal

import jax
import numpy as np
import pytest

from rest_jax.grow import base, dataset as growdata
from rest_jax.config import GrowConfig, SamplingConfig
from rest_jax.grow.step import run_grow
from rest_jax.rewards import ExactMatch, score
from rest_jax.grow.fake import FakeSampler
from rest_jax.grow.sampler import Sampler
from rest_jax.parallel import preemption
from conftest import mesh_layout
from rest_jax.tasks import BYTE_VOCAB


def _ids(text):
  return np.asarray(BYTE_VOCAB.encode(text) + [1], np.int32)


def answer_sampler(n):
  """Sample k of example e is the text "a<e>" when k is even, else "x" (then EOS)."""
  return FakeSampler(n, sample_fn=lambda prompt, e, k: BYTE_VOCAB.encode(
      f"a{e}" if k % 2 == 0 else "x"))


def _prompts(ids, labeled):
  return [{"inputs": _ids(f"p{i}"), "targets": _ids(f"a{i}"), "inputs_pretokenized": f"p{i}",
           "targets_pretokenized": f"a{i}", "example_id": i, "labeled": labeled} for i in ids]


def _reward(sources, hyps, refs):
  return score(ExactMatch(), "exact_match", sources, hyps, refs)


def test_grow_writes_samples_scored_and_originals_only_for_labeled(tmp_path):
  prompts = _prompts(range(3), True) + _prompts(range(10, 13), False)
  cfg = GrowConfig(sampling=SamplingConfig(num_samples=2, batch_size=4), chunk_size=4)
  writer = growdata.GrowWriter(str(tmp_path))
  sampler = answer_sampler(2)
  assert run_grow(sampler=sampler, params=None, prompts=prompts, reward=_reward,
                  vocab=BYTE_VOCAB, writer=writer, grow_step=1, seed=0, config=cfg,
                  input_len=8, target_len=8, progress=False) == 2
  growdata.finalize(str(tmp_path))
  records = {(r.example_id, r.sample_idx): r for r in growdata.read_records(str(tmp_path))}
  assert len(records) == 6 * 2 + 3  # Every prompt sampled twice; originals of D only.
  assert {k for k, r in records.items() if r.is_original} == {(0, -1), (1, -1), (2, -1)}
  for i in list(range(3)) + list(range(10, 13)):
    assert records[(i, 0)].reward == 1.0 and records[(i, 0)].targets_pretokenized == f"a{i}"
    assert records[(i, 1)].reward == 0.0 and records[(i, 1)].targets_pretokenized == "x"
    np.testing.assert_allclose(records[(i, 0)].behaviour_logprobs,
                               -0.5 * np.ones(len(f"a{i}") + 1))
  np.testing.assert_allclose(records[(0, -1)].behaviour_logprobs, -0.25 * np.ones(3))
  stats = growdata.read_stats(str(tmp_path))
  assert stats.mean == 0.5  # Over the samples only.


def test_grow_resumes_at_the_first_missing_chunk(tmp_path):
  prompts = _prompts(range(6), True)
  cfg = GrowConfig(sampling=SamplingConfig(num_samples=1, batch_size=2), chunk_size=2)
  writer = growdata.GrowWriter(str(tmp_path))
  writer.write_chunk(0, [])  # Chunk 0 already complete (its content is not re-made).
  sampler = answer_sampler(1)
  assert run_grow(sampler=sampler, params=None, prompts=prompts, reward=_reward,
                  vocab=BYTE_VOCAB, writer=writer, grow_step=1, seed=0, config=cfg,
                  input_len=8, target_len=8, progress=False) == 2
  assert sampler.calls["generate"] == 2  # Only chunks 1 and 2 were sampled.
  assert writer.completed_chunks() == {0, 1, 2}


def test_both_samplers_implement_the_protocol():
  layout = mesh_layout(devices=jax.devices()[:1])
  assert isinstance(Sampler(None, layout, num_samples=2, max_decode_len=4), base.Sampler)
  assert isinstance(FakeSampler(), base.Sampler)


def test_fake_sampler_keeps_the_sample_output_contract():
  sampler = FakeSampler(2, max_decode_len=4,
                        sample_fn=lambda prompt, e, k: list(prompt) * (k + 1) + [e + 10])
  inputs = np.asarray([[5, 6, 1, 0], [7, 0, 0, 0]], np.int32)  # Prompts [5, 6] and [7].
  out = sampler.generate(None, inputs, np.asarray([3, 4]), seed=0, grow_step=1)
  np.testing.assert_array_equal(out.tokens, [[5, 6, 13, 1], [5, 6, 5, 6], [7, 14, 1, 0],
                                             [7, 7, 14, 1]])
  np.testing.assert_array_equal(out.lengths, [4, 4, 3, 4])  # Cut at max_decode_len.
  np.testing.assert_array_equal(out.logprobs, np.where(out.tokens > 0, -0.5, 0.0))
  np.testing.assert_array_equal(out.example_ids, [3, 3, 4, 4])
  np.testing.assert_array_equal(out.sample_idx, [0, 1, 0, 1])
  tokens, lengths = sampler.greedy(None, inputs)  # Echoes the prompt, then EOS.
  np.testing.assert_array_equal(tokens, [[5, 6, 1, 0], [7, 1, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 2])
  np.testing.assert_array_equal(sampler.score(None, inputs, np.asarray([[9, 1], [9, 0]])),
                                [[-0.25, -0.25], [-0.25, 0.0]])
  assert sampler.calls == {"generate": 1, "greedy": 1, "score": 1}


def _records(directory):
  return {(r.example_id, r.sample_idx): (r.targets_pretokenized, r.reward)
          for r in growdata.read_records(directory)}


@pytest.mark.parametrize("signal_at_call,kept", [(1, set()), (2, {0})])
def test_sigterm_drops_the_unfinished_chunk_and_the_rerun_equals_uninterrupted(
    tmp_path, signal_at_call, kept):
  prompts = _prompts(range(7), True)
  cfg = GrowConfig(sampling=SamplingConfig(num_samples=2, batch_size=2), chunk_size=4)
  grow = lambda sampler, directory: run_grow(
      sampler=sampler, params=None, prompts=prompts, reward=_reward, vocab=BYTE_VOCAB,
      writer=growdata.GrowWriter(directory), grow_step=1, seed=0, config=cfg, input_len=8,
      target_len=8, progress=False)
  ref = str(tmp_path / "ref")
  grow(answer_sampler(2), ref)
  growdata.finalize(ref)

  sampler = answer_sampler(2)
  generate = sampler.generate

  def generate_then_sigterm(*args, **kwargs):  # SIGTERM while a sampler batch runs.
    out = generate(*args, **kwargs)
    if sampler.calls["generate"] == signal_at_call:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  sampler.generate = generate_then_sigterm
  work = str(tmp_path / "work")
  assert preemption.install() == "signal"
  try:
    # Two sampler batches per chunk: a signal in the first drops chunk 0, in the second keeps it.
    with pytest.raises(preemption.Preempted, match="grow g1 kept its complete chunks"):
      grow(sampler, work)
  finally:
    preemption.uninstall()
  assert sampler.calls["generate"] == signal_at_call  # It stopped after that batch.
  assert growdata.GrowWriter(work).completed_chunks() == kept
  assert grow(answer_sampler(2), work) == 2 - len(kept)  # The rerun makes the missing chunks.
  growdata.finalize(work)
  assert _records(work) == _records(ref)
