"""The Grow step against a fake sampler: records, rewards, originals, unlabeled prompts, resume."""

import numpy as np

from rest_jax.grow import dataset as growdata
from rest_jax.config import GrowConfig, SamplingConfig
from rest_jax.grow.step import run_grow
from rest_jax.rewards import ExactMatch, score
from rest_jax.grow.sampler import SampleOutput
from rest_jax.tasks import BYTE_VOCAB


def _ids(text):
  return np.asarray(BYTE_VOCAB.encode(text) + [1], np.int32)


class FakeSampler:
  """Sample n of prompt "p<k>" is the text "a<k>" when n is even, else "x" (EOS-terminated)."""

  def __init__(self, n):
    self.n = n
    self.calls = 0

  def generate(self, params, inputs, example_ids, *, seed, grow_step):
    self.calls += 1
    rows = []
    for b, example_id in enumerate(example_ids):
      for n in range(self.n):
        rows.append(_ids(f"a{example_id}" if n % 2 == 0 else "x"))
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
    logprobs = -0.5 * (tokens > 0).astype(np.float32)
    return SampleOutput(tokens, logprobs, lengths, np.repeat(example_ids, self.n),
                        np.tile(np.arange(self.n, dtype=np.int32), len(example_ids)), width)

  def score(self, params, inputs, targets):
    return -0.25 * (targets > 0).astype(np.float32)


def _prompts(ids, labeled):
  return [{"inputs": _ids(f"p{i}"), "targets": _ids(f"a{i}"), "inputs_pretokenized": f"p{i}",
           "targets_pretokenized": f"a{i}", "example_id": i, "labeled": labeled} for i in ids]


def _reward(sources, hyps, refs):
  return score(ExactMatch(), "exact_match", sources, hyps, refs)


def test_grow_writes_samples_scored_and_originals_only_for_labeled(tmp_path):
  prompts = _prompts(range(3), True) + _prompts(range(10, 13), False)
  cfg = GrowConfig(sampling=SamplingConfig(num_samples=2, batch_size=4), chunk_size=4)
  writer = growdata.GrowWriter(str(tmp_path))
  sampler = FakeSampler(2)
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
  sampler = FakeSampler(1)
  assert run_grow(sampler=sampler, params=None, prompts=prompts, reward=_reward,
                  vocab=BYTE_VOCAB, writer=writer, grow_step=1, seed=0, config=cfg,
                  input_len=8, target_len=8, progress=False) == 2
  assert sampler.calls == 2  # Only chunks 1 and 2 were sampled.
  assert writer.completed_chunks() == {0, 1, 2}
