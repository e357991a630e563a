"""Decoding and the Sampler against a deterministic fake model with hand-computed outputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.grow.decoding import _candidates as decoding_candidates
from rest_jax.grow.decoding import decode, inverse_cdf, row_keys, sample_logits
from rest_jax.errors import RestJaxError
from rest_jax.models import build_model, get_preset
from rest_jax.models.base import EOS_ID, ModelConfig, SequenceModel
from rest_jax.grow.sampler import Sampler, place_params
from conftest import mesh_layout

VOCAB = 8
NEG = -1e9


def successor(r: int, k: int = 1) -> int:
  """The k-th most likely token after token r in the fake model (content tokens are 2..7)."""
  return 2 + (r + k) % 6


def prob_table() -> np.ndarray:
  """P[r, x]: next-token probabilities after token r: 1/2, 1/4, and 1/16 for the other four."""
  p = np.zeros((VOCAB, VOCAB))
  for r in range(VOCAB):
    p[r, 2:] = 1 / 16
    p[r, successor(r)] = 1 / 2
    p[r, successor(r, 2)] = 1 / 4
  return p


class FakeModel(nnx.Module):
  """Logits depend only on the previous token and the position.

  A prompt is [eos_at, start, ...]: position 0 follows the token ``start``; at position
  ``eos_at`` the model emits EOS with probability 1, elsewhere never; otherwise the next token
  after r has log-probs ``log(prob_table()[r])``.
  """

  def __init__(self):
    self.config = ModelConfig(vocab_size=VOCAB)
    with np.errstate(divide="ignore"):
      table = np.maximum(np.log(prob_table()), NEG).astype(np.float32)
    self.table = nnx.Param(jnp.asarray(table), out_sharding=("embed", "vocab"),
                           eager_sharding=False)

  def _logits(self, prev, t, eos_at):
    eos_row = jnp.full((VOCAB,), NEG).at[EOS_ID].set(0.0)
    at_eos = (t == eos_at)[..., None]
    return jnp.where(at_eos, eos_row, self.table[...][prev])

  def __call__(self, inputs, targets):
    prev = jnp.concatenate([inputs[:, 1:2], targets[:, :-1]], axis=1)
    t = jnp.arange(targets.shape[1])[None, :]
    return self._logits(prev, t, inputs[:, :1])

  def prefill(self, inputs, max_decode_len, repeats=1):
    rows = lambda x: jnp.repeat(x, repeats, axis=0)
    cache = {"eos_at": rows(inputs[:, 0]), "memory": rows(inputs.astype(jnp.float32))}
    return self._logits(rows(inputs[:, 1]), 0, cache["eos_at"]), cache

  def decode_step(self, tokens, cache, index):
    return self._logits(tokens, index + 1, cache["eos_at"]), cache

  def cache_logical_axes(self, cache):
    return {"eos_at": ("cache_batch",), "memory": ("cache_batch", "length")}


def fake_state():
  graphdef, state = nnx.split(FakeModel())
  return graphdef, state


def prompts(pairs) -> np.ndarray:
  """Prompts [eos_at, start, 0, 0] for (eos_at, start) pairs."""
  return np.array([[e, s, 0, 0] for e, s in pairs], np.int32)


LOG = {p: math.log(p) for p in (1 / 2, 1 / 4, 1 / 16)}


def one_device_layout():
  return mesh_layout(devices=jax.devices()[:1])


def test_fake_model_implements_protocol():
  assert isinstance(FakeModel(), SequenceModel)


def test_greedy_exact_tokens_eos_and_lengths():
  graphdef, state = fake_state()
  sampler = Sampler(graphdef, one_device_layout(), num_samples=1, max_decode_len=6)
  tokens, lengths = sampler.greedy(state, prompts([(3, 0), (0, 2), (9, 7), (1, 5)]))
  # Chains: 0 -> 3 -> 6 -> 3; 7 -> 4 -> 7 -> ...; 5 -> 2.
  np.testing.assert_array_equal(tokens, [[3, 6, 3, 1, 0, 0],
                                         [1, 0, 0, 0, 0, 0],
                                         [4, 7, 4, 7, 4, 7],
                                         [2, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [4, 1, 6, 2])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32


def test_greedy_logprobs_are_model_log_softmax():
  model = FakeModel()
  inputs = jnp.asarray(prompts([(3, 0), (5, 7)]))
  logits, cache = model.prefill(inputs, 8)
  out = decode(model.decode_step, logits, cache, None, max_decode_len=8, greedy=True,
               temperature=0.5, top_k=1)  # Sampling options are ignored when greedy.
  np.testing.assert_array_equal(out.tokens, [[3, 6, 3, 1, 0, 0, 0, 0],
                                             [4, 7, 4, 7, 4, 1, 0, 0]])
  half = LOG[1 / 2]
  np.testing.assert_allclose(out.logprobs, [[half] * 3 + [0] * 5, [half] * 5 + [0] * 3],
                             atol=1e-6)
  np.testing.assert_allclose(out.logprobs.sum(1), [3 * half, 5 * half], atol=1e-5)
  assert int(out.num_steps) == 5  # The loop stops once the last row has emitted EOS.


def test_generate_rows_order_eos_padding_and_logprobs():
  graphdef, state = fake_state()
  pairs = [(3, 0), (5, 4), (0, 2)]
  n, length = 4, 7
  sampler = Sampler(graphdef, one_device_layout(), num_samples=n, max_decode_len=length)
  ids = np.array([11, 12, 13], np.int64)
  out = sampler.generate(state, prompts(pairs), ids, seed=5, grow_step=2)
  assert out.tokens.shape == (12, length) and out.logprobs.shape == (12, length)
  np.testing.assert_array_equal(out.example_ids, np.repeat(ids, n))
  np.testing.assert_array_equal(out.sample_idx, np.tile(np.arange(n), 3))
  p = prob_table()
  for row in range(12):
    eos_at, start = pairs[row // n]  # Row b * N + n is prompt b.
    assert out.lengths[row] == eos_at + 1
    assert out.tokens[row, eos_at] == EOS_ID and out.logprobs[row, eos_at] == 0.0
    np.testing.assert_array_equal(out.tokens[row, eos_at + 1:], 0)
    np.testing.assert_array_equal(out.logprobs[row, eos_at + 1:], 0.0)
    prev, expected = start, 0.0
    for t in range(eos_at):
      tok = out.tokens[row, t]
      assert 2 <= tok < VOCAB
      np.testing.assert_allclose(out.logprobs[row, t], math.log(p[prev, tok]), atol=1e-5)
      expected += math.log(p[prev, tok])
      prev = tok
    np.testing.assert_allclose(out.logprobs[row].sum(), expected, atol=1e-5)
  # Samples of one prompt differ (four sequences of 3-5 tokens from a spread-out model).
  assert len({tuple(r) for r in out.tokens[4:8]}) > 1
  # Each row is decode() with the key of (seed, grow step, example id, sample index).
  model = FakeModel()
  row = 6  # prompt 1, sample 2
  logits, cache = model.prefill(jnp.asarray(prompts([pairs[1]])), length)
  direct = decode(model.decode_step, logits, cache, row_keys(5, 2, [12], [2]),
                  max_decode_len=length)
  np.testing.assert_array_equal(direct.tokens[0], out.tokens[row])
  np.testing.assert_allclose(direct.logprobs[0], out.logprobs[row], atol=1e-6)
  # Another grow step gives other samples.
  other = sampler.generate(state, prompts(pairs), ids, seed=5, grow_step=3)
  assert not np.array_equal(other.tokens, out.tokens)


def test_top_k_one_and_tiny_top_p_equal_greedy():
  model = FakeModel()
  inputs = jnp.asarray(prompts([(3, 0), (6, 7), (8, 3)]))
  keys = row_keys(0, 0, [0, 1, 2], [0, 0, 0])

  @jax.jit
  def run(inputs, keys):  # Three decodes in one program: one compile.
    logits, cache = model.prefill(inputs, 8)
    return [decode(model.decode_step, logits, cache, keys, max_decode_len=8, **kw)
            for kw in (dict(greedy=True), dict(top_k=1, temperature=2.0),
                       dict(top_p=1e-6, temperature=0.7))]

  greedy, *others = run(inputs, keys)
  np.testing.assert_array_equal(greedy.tokens, [[3, 6, 3, 1, 0, 0, 0, 0],
                                                [4, 7, 4, 7, 4, 7, 1, 0],
                                                [6, 3, 6, 3, 6, 3, 6, 3]])
  for out in others:
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, [4, 7, 8])
    # The behaviour policy puts all its mass on the chosen token.
    np.testing.assert_array_equal(out.logprobs, 0.0)


def sample_variants(logits, keys, variants):
  """sample_logits for several option dicts, in one compiled program (one compile)."""
  fn = jax.jit(lambda l, k: [sample_logits(l, k, **kw) for kw in variants])
  return [(np.asarray(t), np.asarray(lp)) for t, lp in fn(logits, keys)]


def test_sample_logits_top_k_and_top_p_supports_and_logprobs():
  probs = np.array([0.0625, 0.5, 0.125, 0.25, 0.0625])
  rows = 512
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (rows, 1))
  keys = jax.random.split(jax.random.key(0), rows)
  (*same_two, three, top_only, unfiltered) = sample_variants(
      logits, keys, [dict(top_k=2), dict(top_p=0.6), dict(top_p=0.75), dict(top_p=0.8),
                     dict(top_p=0.5), dict()])
  for tokens, logprobs in same_two:
    # Top-2 is {1: 1/2, 3: 1/4}; top-p 0.6 and 0.75 keep the same two (mass 0.75 >= p).
    assert set(tokens) == {1, 3}
    np.testing.assert_allclose(logprobs[tokens == 1], math.log(2 / 3), atol=1e-5)
    np.testing.assert_allclose(logprobs[tokens == 3], math.log(1 / 3), atol=1e-5)
  tokens, logprobs = three  # top_p 0.8 keeps {1, 3, 2}: mass 0.875.
  assert set(tokens) == {1, 2, 3}
  np.testing.assert_allclose(logprobs[tokens == 2], math.log(0.125 / 0.875), atol=1e-5)
  np.testing.assert_allclose(logprobs[tokens == 1], math.log(0.5 / 0.875), atol=1e-5)
  tokens, logprobs = top_only  # top_p 0.5: the top token alone has mass 0.5.
  np.testing.assert_array_equal(tokens, 1)
  np.testing.assert_array_equal(logprobs, 0.0)
  tokens, logprobs = unfiltered  # Every token appears, with its own log-prob.
  assert set(tokens) == set(range(5))
  np.testing.assert_allclose(logprobs, np.log(probs[tokens]), atol=1e-5)


def test_temperature_frequencies_match_tempered_softmax():
  rows = 4000
  logits = jnp.tile(jnp.array([[NEG, 0.0, math.log(3.0)]], jnp.float32), (rows, 1))
  keys = jax.random.split(jax.random.key(1), rows)
  cases = ((1.0, 0.25), (0.5, 0.1), (2.0, 1 / (1 + math.sqrt(3))))
  results = sample_variants(logits, keys, [dict(temperature=t) for t, _ in cases])
  for (temperature, p1), (tokens, logprobs) in zip(cases, results):
    assert set(tokens) <= {1, 2}
    # Binomial std <= 0.007 here; the three target frequencies are >= 0.11 apart.
    assert abs(np.mean(tokens == 1) - p1) < 0.03, (temperature, np.mean(tokens == 1))
    np.testing.assert_allclose(logprobs[tokens == 1], math.log(p1), atol=1e-5)
    np.testing.assert_allclose(logprobs[tokens == 2], math.log(1 - p1), atol=1e-5)


def _filtered_probs(probs: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
  """The distribution sample_logits should draw from, computed independently in numpy."""
  p = probs ** (1.0 / temperature)
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros(p.shape, bool)
  keep[order[:top_k or len(p)]] = True
  p = np.where(keep, p, 0.0) / p[keep].sum()
  before = np.cumsum(p[order]) - p[order]
  keep[order[before >= top_p]] = False
  return np.where(keep, p, 0.0) / p[keep].sum()


def _spread(vocab: int, support: dict[int, float]) -> np.ndarray:
  probs = np.zeros(vocab)
  probs[list(support)] = list(support.values())
  return probs / probs.sum()


@pytest.mark.parametrize("probs", [
    np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05]),
    # 600 entries: the two-level draw (blocks of 128), mass on both sides of block edges.
    _spread(600, {3: 3.0, 127: 1.0, 128: 2.0, 255: 1.5, 256: 1.2, 400: 0.8, 599: 0.5})],
    ids=["vocab7", "vocab600"])
def test_inverse_cdf_sampling_passes_a_chi_square_test(probs):
  """20000 draws per variant, fixed seed; chi-square goodness of fit against the filtered
  distribution, rejected above the 0.999 quantile of chi2(kept - 1) (alpha = 1e-3, chosen
  from the distribution, not tuned). The same draws fail against a slightly wrong
  distribution, so the test has the power to catch a biased sampler."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  rows = 20000
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (rows, 1))
  keys = jax.random.split(jax.random.key(7), rows)
  variants = [dict(), dict(temperature=0.5)]
  if len(probs) < 100:  # Top-k and top-p select candidates before the draw (sizes alike).
    variants += [dict(top_k=4), dict(top_p=0.6), dict(temperature=1.5, top_k=6, top_p=0.9)]
  for kw, (tokens, logprobs) in zip(variants, sample_variants(logits, keys, variants)):
    expected = _filtered_probs(probs, **kw)
    counts = np.bincount(tokens, minlength=len(probs))
    kept = expected > 0
    assert counts[~kept].sum() == 0, kw  # Filtered tokens are never drawn.
    threshold = stats.chi2.ppf(0.999, kept.sum() - 1)
    chi2 = np.sum((counts[kept] - rows * expected[kept]) ** 2 / (rows * expected[kept]))
    assert chi2 < threshold, (kw, chi2, threshold, counts)
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)
    wrong = expected.copy()
    wrong[kept.nonzero()[0][:2]] += [-0.02, 0.02]  # 2 points of mass moved to the 2nd token.
    chi2_wrong = np.sum((counts[kept] - rows * wrong[kept]) ** 2 / (rows * wrong[kept]))
    assert chi2_wrong > threshold, (kw, chi2_wrong, threshold)


def test_inverse_cdf_matches_numpy_searchsorted():
  probs = np.random.default_rng(5).gamma(0.3, size=1000).astype(np.float32)
  us = np.random.default_rng(6).random(4000).astype(np.float32)
  got = np.asarray(jax.jit(jax.vmap(inverse_cdf, in_axes=(None, 0)))(probs, us))
  cdf = np.cumsum(probs.astype(np.float64))
  want = np.searchsorted(cdf / cdf[-1], us, side="right")
  # Equal except where u lies within float32 rounding of a boundary.
  near = np.abs(cdf[np.minimum(want, 999)] / cdf[-1] - us) < 1e-5
  assert np.all((got == want) | near) and np.mean(got == want) > 0.99


@pytest.mark.parametrize("top_p", [0.333, 0.9051])  # Not a multiple of 1/300.
def test_top_p_without_sorting_keeps_the_sorted_prefix(top_p):
  logits = np.random.default_rng(8).normal(size=(40, 300)).astype(np.float32) * 2
  logits[0] = 0.0  # All tied: the lower ids come first.
  logits[1, :7] = 5.0  # Ties at the top.
  fn = jax.jit(jax.vmap(lambda row: decoding_candidates(row, temperature=0.7, top_k=0,
                                                       top_p=top_p)[0]))
  kept = np.isfinite(np.asarray(fn(logits)))
  for row in range(40):
    probs = np.exp(logits[row].astype(np.float64) / 0.7)
    np.testing.assert_array_equal(kept[row], _filtered_probs(probs / probs.sum(), top_p=top_p)
                                  > 0, err_msg=f"row {row}")
  assert kept[0].sum() == int(np.ceil(top_p * 300)) and kept[0][:kept[0].sum()].all()


def test_inverse_cdf_never_draws_a_zero_mass_entry():
  probs = jnp.array([0.0, 0.5, 0.0, 0.5, 0.0])
  draws = [int(inverse_cdf(probs, jnp.float32(u))) for u in (0.0, 0.49, 0.5, 0.9999999)]
  assert draws == [1, 1, 3, 3]


def test_sample_logits_rows_are_independent():
  logits = np.random.default_rng(2).normal(size=(6, 50)).astype(np.float32)
  keys = jax.random.split(jax.random.key(3), 6)
  kw = dict(temperature=0.8, top_k=10, top_p=0.9)
  fn = jax.jit(lambda l, k: (sample_logits(l, k, **kw), sample_logits(l[4:5], k[4:5], **kw)))
  (tokens, logprobs), (one_token, one_logprob) = fn(logits, keys)
  assert int(one_token[0]) == int(tokens[4])
  np.testing.assert_allclose(one_logprob[0], logprobs[4], atol=1e-6)


@pytest.mark.default_xla
def test_same_samples_for_batch_sizes_1_3_8_and_padding():
  graphdef, state = fake_state()
  pairs = [(3, 0), (5, 4), (0, 2), (6, 7), (2, 3), (4, 5), (7, 6), (1, 1)]
  inputs, ids = prompts(pairs), np.arange(100, 108)
  results = {}
  for layout_name, layout in (("one", one_device_layout()), ("data8", mesh_layout(8, 1, 1))):
    sampler = Sampler(graphdef, layout, num_samples=3, max_decode_len=9, temperature=0.9,
                      batch_size=3 if layout_name == "one" else None)
    state_placed = place_params(state, layout, sampling=True)
    for bs in (1, 3, 8):
      parts = [sampler.generate(state_placed, inputs[i:i + bs], ids[i:i + bs], seed=1,
                                grow_step=0) for i in range(0, 8, bs)]
      results[layout_name, bs] = (np.concatenate([p.tokens for p in parts]),
                                  np.concatenate([p.logprobs for p in parts]),
                                  np.concatenate([p.example_ids for p in parts]))
  ref = results["one", 8]
  assert ref[0].shape == (24, 9)
  np.testing.assert_array_equal(ref[2], np.repeat(ids, 3))
  # Bit-identical, tokens and log-probs (measured at XLA's default level and at level 0): the
  # per-row computation does not depend on the batch it shares a call with.
  for key, (tokens, logprobs, example_ids) in results.items():
    np.testing.assert_array_equal(tokens, ref[0], err_msg=str(key))
    np.testing.assert_array_equal(logprobs, ref[1], err_msg=str(key))
    np.testing.assert_array_equal(example_ids, ref[2])


def test_loop_exits_early_and_padding_rows_do_not_keep_it_running():
  graphdef, state = fake_state()
  # Batch 3 on 8 data shards: 5 padding rows (copies of prompt 0, inactive).
  sampler = Sampler(graphdef, mesh_layout(8, 1, 1), num_samples=2, max_decode_len=50)
  out = sampler.generate(state, prompts([(3, 0), (3, 4), (2, 5)]), np.arange(3), seed=0,
                         grow_step=0)
  assert out.num_steps == 3  # Tokens 0..3 (EOS at 3) need three decode steps, not 49.
  np.testing.assert_array_equal(out.lengths, [4, 4, 4, 4, 3, 3])
  out = sampler.generate(state, prompts([(3, 0), (99, 4)]), np.arange(2), seed=0,
                         grow_step=0)
  assert out.num_steps == 49  # One row never emits EOS: the loop runs to max_decode_len.
  np.testing.assert_array_equal(out.lengths, [4, 4, 50, 50])


def test_score_teacher_forced_logprobs():
  graphdef, state = fake_state()
  sampler = Sampler(graphdef, mesh_layout(2, 2, 2), num_samples=1, max_decode_len=4)
  inputs = prompts([(2, 0), (3, 5)])
  targets = np.array([[3, 4, 1, 0, 0], [2, 3, 2, 1, 0]], np.int32)
  # Row 0: 0 -> 3 (1/2), 3 -> 4 (1/16), EOS at 2 (prob 1), pad (0).
  # Row 1: 5 -> 2 (1/2), 2 -> 3 (1/16), 3 -> 2 (1/16), EOS at 3, pad.
  expected = [[LOG[1 / 2], LOG[1 / 16], 0, 0, 0],
              [LOG[1 / 2], LOG[1 / 16], LOG[1 / 16], 0, 0]]
  np.testing.assert_allclose(sampler.score(state, inputs, targets), expected, atol=1e-5)


# The encoder-decoder samples with top-k / top-p (vocab split over "tensor" on (2, 1, 4)); the
# decoder-only one at temperature 1, where behaviour log-probs must equal teacher forcing.
# Mesh (8, 1, 1) (pure data parallelism, batch padding) is covered with the fake model above:
# each real-model compile costs several CPU seconds.
@pytest.mark.default_xla
@pytest.mark.parametrize("preset,options", [
    ("tiny", dict(temperature=0.9, top_k=100, top_p=0.95)),
    ("tiny_decoder", dict(temperature=1.0)),
])
def test_real_model_sharded_samples_equal_one_device(preset, options):
  graphdef, state = nnx.split(build_model(get_preset(preset), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 260, (4, 6)).astype(np.int32)
  inputs[1, 3:] = 0
  inputs[2, 5:] = 0
  ids = np.array([7, 3, 9, 1])

  def run(layout):
    sampler = Sampler(graphdef, layout, num_samples=2, max_decode_len=6, **options)
    return sampler, sampler.generate(state, inputs, ids, seed=3, grow_step=1)

  sampler, ref = run(one_device_layout())
  assert ref.tokens.shape == (8, 6)
  if options["temperature"] == 1.0:
    scored = sampler.score(state, np.repeat(inputs, 2, axis=0), ref.tokens)
    mask = ref.tokens != 0
    np.testing.assert_allclose(scored[mask], ref.logprobs[mask], atol=1e-5)
  # Tokens and lengths bit-identical; log-probs not (sharded matmuls over "tensor" / "fsdp" sum
  # in another order): measured max |diff| 1.4e-6 at XLA's default level (2.4e-6 at level 0),
  # tolerance 1e-5. With float32 on CPU no near-tie flips a token here; see docs/multihost.md.
  for mesh in ((2, 2, 2), (2, 1, 4)):
    _, got = run(mesh_layout(*mesh))
    print(f"\n{preset} {mesh}: max |logprob diff| {np.max(np.abs(got.logprobs - ref.logprobs)):.3g}")
    np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=str(mesh))
    np.testing.assert_array_equal(got.lengths, ref.lengths, err_msg=str(mesh))
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0, err_msg=str(mesh))


@pytest.mark.parametrize("preset", ["tiny", "tiny_decoder"])
def test_prompt_cache_shared_by_the_samples_gives_the_copied_cache_samples(preset):
  """The prompt's cache stored once for its N rows (default) draws the same samples as the
  prompt's cache copied into every row, and the teacher-forced scores of the samples."""
  graphdef, state = nnx.split(build_model(get_preset(preset), rngs=nnx.Rngs(0)))
  inputs = np.random.default_rng(1).integers(2, 260, (4, 7)).astype(np.int32)
  inputs[0, 2:] = 0
  inputs[3, 5:] = 0
  ids = np.array([4, 8, 15, 16])
  got = {}
  for share in (True, False):
    sampler = Sampler(graphdef, mesh_layout(2, 2, 2), num_samples=3, max_decode_len=7,
                      temperature=1.0, share_prompt_cache=share)
    got[share] = sampler.generate(state, inputs, ids, seed=5, grow_step=2)
  np.testing.assert_array_equal(got[True].tokens, got[False].tokens)
  np.testing.assert_array_equal(got[True].lengths, got[False].lengths)
  np.testing.assert_allclose(got[True].logprobs, got[False].logprobs, atol=1e-5, rtol=0)
  scored = sampler.score(state, np.repeat(inputs, 3, axis=0), got[True].tokens)
  mask = got[True].tokens != 0
  np.testing.assert_allclose(scored[mask], got[True].logprobs[mask], atol=1e-5)


def test_user_errors():
  graphdef, state = fake_state()
  with pytest.raises(RestJaxError, match="temperature"):
    Sampler(graphdef, one_device_layout(), num_samples=2, max_decode_len=4, temperature=0.0)
  with pytest.raises(RestJaxError, match="top_p"):
    Sampler(graphdef, one_device_layout(), num_samples=2, max_decode_len=4, top_p=1.5)
  sampler = Sampler(graphdef, one_device_layout(), num_samples=2, max_decode_len=4)
  with pytest.raises(RestJaxError, match="example ids"):
    sampler.generate(state, prompts([(1, 0)]), np.array([2**33]), seed=0, grow_step=0)
  with pytest.raises(RestJaxError, match="one id per prompt"):
    sampler.generate(state, prompts([(1, 0)]), np.arange(2), seed=0, grow_step=0)


def test_rounds_from_first_sample_equal_one_larger_draw():
  """Adaptive Grow's rounds (N=2 at first_sample 0 and 2) draw the samples N=4 draws."""
  graphdef, state = fake_state()
  inputs, ids = prompts([(3, 0), (5, 4), (0, 2)]), np.arange(7, 10)
  layout = one_device_layout()
  state_placed = place_params(state, layout, sampling=True)
  big = Sampler(graphdef, layout, num_samples=4, max_decode_len=9, temperature=0.9)
  small = Sampler(graphdef, layout, num_samples=2, max_decode_len=9, temperature=0.9)
  ref = big.generate(state_placed, inputs, ids, seed=3, grow_step=1)
  rounds = [small.generate(state_placed, inputs[1:], ids[1:], seed=3, grow_step=1,
                           first_sample=f) for f in (0, 2)]
  for r, out in enumerate(rounds):
    rows = np.asarray([4 * b + 2 * r + j for b in (1, 2) for j in range(2)])
    np.testing.assert_array_equal(out.sample_idx, ref.sample_idx[rows])
    np.testing.assert_array_equal(out.tokens, ref.tokens[rows])
    np.testing.assert_array_equal(out.logprobs, ref.logprobs[rows])
  assert len({tuple(t) for t in ref.tokens[:4]}) > 1  # The four samples are not all equal.
