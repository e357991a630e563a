"""Models: T5.1.1 encoder-decoder and Llama decoder-only behind the SequenceModel interface."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models import (PRESETS, SequenceModel, abstract_model, build_model, count_params,
                             get_preset)
from rest_jax.models.layers import (RMSNorm, apply_rope, dot_product_attention,
                                    relative_position_bucket)
from rest_jax.models.llama import left_align
from rest_jax.models.attention import prefix_attention
from conftest import mesh_layout

FAMILIES = ("tiny", "tiny_decoder")

# Right-padded prompts of lengths 4, 2, 1, 6 and targets of lengths 4, 2, 5, 3.
INPUTS = np.array([[5, 6, 7, 1, 0, 0],
                   [8, 9, 0, 0, 0, 0],
                   [3, 0, 0, 0, 0, 0],
                   [20, 21, 22, 23, 24, 1]], np.int32)
TARGETS = np.array([[10, 11, 12, 1, 0],
                    [13, 1, 0, 0, 0],
                    [14, 15, 16, 17, 1],
                    [30, 31, 1, 0, 0]], np.int32)


@functools.cache
def _model(name: str):
  # The "unsafe_rbg" PRNG compiles much faster than threefry on CPU (tests stay quick).
  return build_model(get_preset(name), rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
  return _model(request.param)


@functools.cache
def _jitted(model):
  """Jitted teacher-forcing / prefill / decode_step through nnx.split + nnx.merge."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, inputs, targets):
    return nnx.merge(graphdef, state)(inputs, targets)

  @functools.partial(jax.jit, static_argnums=2)
  def prefill(state, inputs, max_decode_len):
    return nnx.merge(graphdef, state).prefill(inputs, max_decode_len)

  @jax.jit
  def decode(state, tokens, cache, index):
    return nnx.merge(graphdef, state).decode_step(tokens, cache, index)

  return state, forward, prefill, decode


def _chain(prefill, decode, state, inputs, targets):
  logits, cache = prefill(state, inputs, targets.shape[1])
  steps = [logits]
  for t in range(targets.shape[1] - 1):
    logits, cache = decode(state, targets[:, t], cache, jnp.int32(t))
    steps.append(logits)
  return jnp.stack(steps, axis=1), cache


# --- hand-checkable pieces -----------------------------------------------------------------


def test_relative_position_bucket_matches_t5_formula():
  # Bidirectional, 32 buckets, max_distance 128: 16 buckets per direction, 8 exact.
  # rel = key - query. rel=-20: 8 + int(log(20/8) / log(128/8) * 8) = 8 + int(2.64) = 10.
  # rel=-200: 8 + int(log(25) / log(16) * 8) = 17 -> capped at 15. Keys after: +16.
  rel = jnp.array([0, -3, 3, -7, -8, -20, 20, -200, 200])
  got = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(got, [0, 3, 19, 7, 8, 10, 26, 15, 31])
  # Causal, 32 buckets: 16 exact. rel=-20: 16 + int(log(20/16) / log(8) * 16) = 16 + 1 = 17;
  # rel=-100: 16 + int(log(6.25) / log(8) * 16) = 16 + 14 = 30; far -> 31; future keys -> 0.
  rel = jnp.array([0, 5, -5, -15, -16, -20, -100, -1000])
  got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(got, [0, 0, 5, 15, 16, 17, 30, 31])


def test_rope_rotates_pairs_half_apart():
  # head_dim 4, theta 10000: inverse frequencies (1, 0.01); dims (0, 2) and (1, 3) rotate.
  x = jnp.array([1.0, 0.0, 0.0, 2.0]).reshape(1, 1, 1, 4)
  out = apply_rope(x, jnp.array([[3]]), theta=10000.0).reshape(4)
  expected = [math.cos(3.0), -2.0 * math.sin(0.03), math.sin(3.0), 2.0 * math.cos(0.03)]
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply_rope(x, jnp.array([[0]]), theta=10000.0), x)
  # Scores depend on relative positions only.
  q, k = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 1, 8)), jnp.float32)
  score = lambda m, n: jnp.sum(apply_rope(q, jnp.array([[m]]), theta=100.0) *
                               apply_rope(k, jnp.array([[n]]), theta=100.0))
  np.testing.assert_allclose(score(7, 4), score(3, 0), rtol=1e-5)


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  norm = RMSNorm(5, eps=1e-6)
  norm.scale.set_value(jnp.arange(1.0, 6.0))
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * np.arange(1.0, 6.0)
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


def test_grouped_query_attention_matches_numpy():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 2, 4, 3)).astype(np.float32)  # 4 query heads
  k = rng.normal(size=(1, 3, 2, 3)).astype(np.float32)  # 2 kv heads
  v = rng.normal(size=(1, 3, 2, 3)).astype(np.float32)
  mask = np.array([[[True, False, True], [True, True, False]]])
  got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              mask=jnp.asarray(mask), scale=0.5)
  for h in range(4):
    logits = 0.5 * q[0, :, h] @ k[0, :, h // 2].T
    logits = np.where(mask[0], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[0, :, h], probs @ v[0, :, h // 2], rtol=1e-5, atol=1e-6)


def test_shared_keys_and_prefix_attention_equal_attention_over_copied_keys():
  """Keys stored once per prompt and read by its r rows (the N samples of a prompt) give the
  attention over keys copied into every row; ``prefix_attention`` over a shared prefix and
  per-row keys gives one softmax over their concatenation."""
  rng = np.random.default_rng(2)
  prompts, r, heads, kv_heads, d = 3, 4, 4, 2, 5
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q = normal(prompts * r, 2, heads, d)
  pk, pv = normal(prompts, 6, kv_heads, d), normal(prompts, 6, kv_heads, d)
  pmask = jnp.asarray(rng.random((prompts, 6)) < 0.7).at[:, 0].set(True)
  rows = lambda x: jnp.repeat(x, r, axis=0)
  bias = normal(heads, 2, 6)
  shared = dot_product_attention(q, pk, pv, mask=pmask[:, None, :], bias=bias, scale=0.3)
  copied = dot_product_attention(q, rows(pk), rows(pv), mask=rows(pmask)[:, None, :],
                                 bias=bias, scale=0.3)
  np.testing.assert_allclose(shared, copied, rtol=1e-5, atol=1e-6)
  k, v = normal(prompts * r, 3, kv_heads, d), normal(prompts * r, 3, kv_heads, d)
  own_mask = jnp.asarray(rng.random((prompts * r, 2, 3)) < 0.6)
  got = prefix_attention(q, (pk, pv, pmask), (k, v, own_mask), scale=0.3)
  mask = jnp.concatenate([jnp.broadcast_to(rows(pmask)[:, None, :], (prompts * r, 2, 6)),
                          own_mask], axis=-1)
  want = dot_product_attention(q, jnp.concatenate([rows(pk), k], 1),
                               jnp.concatenate([rows(pv), v], 1), mask=mask, scale=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_left_align():
  aligned, valid, positions, prompt_len = left_align(jnp.asarray(INPUTS[:3, :4]))
  np.testing.assert_array_equal(aligned, [[5, 6, 7, 1], [0, 0, 8, 9], [0, 0, 0, 3]])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(valid[1], [False, False, True, True])
  np.testing.assert_array_equal(prompt_len, [4, 2, 1])


def test_t5_query_init_folds_in_attention_scaling():
  attention = _model("tiny").encoder.layers_0.attention  # d_model 32, head_dim 16
  query_std = float(jnp.std(attention.query.kernel.get_value()))
  key_std = float(jnp.std(attention.key.kernel.get_value()))
  assert abs(query_std / (32 * 16) ** -0.5 - 1) < 0.15
  assert abs(key_std / 32 ** -0.5 - 1) < 0.15


# --- the SequenceModel contract ------------------------------------------------------------


def test_decode_chain_reproduces_teacher_forcing(model):
  assert isinstance(model, SequenceModel)
  state, forward, prefill, decode = _jitted(model)
  full = forward(state, INPUTS, TARGETS)
  assert full.shape == TARGETS.shape + (model.config.vocab_size,) and full.dtype == jnp.float32
  chain, cache = _chain(prefill, decode, state, INPUTS, TARGETS)
  np.testing.assert_allclose(chain, full, atol=1e-5, rtol=0)
  # Logits depend on the prompt and on the earlier targets (not a trivial match).
  assert float(jnp.abs(full[0, 1] - full[1, 1]).max()) > 1e-2
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == INPUTS.shape[0]


def test_padding_invariance(model):
  state, forward, prefill, _ = _jitted(model)
  full = forward(state, INPUTS, TARGETS)
  padded = forward(state, np.pad(INPUTS, ((0, 0), (0, 3))), TARGETS)
  np.testing.assert_allclose(padded, full, atol=1e-5, rtol=0)
  prefill_logits, _ = prefill(state, np.pad(INPUTS, ((0, 0), (0, 2))), 2)
  np.testing.assert_allclose(prefill_logits, full[:, 0], atol=1e-5, rtol=0)


def test_targets_only_affect_later_positions(model):
  state, forward, _, _ = _jitted(model)
  changed = TARGETS.copy()
  changed[:, 2] = 40
  a, b = forward(state, INPUTS, TARGETS), forward(state, INPUTS, changed)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
  assert float(jnp.abs(a[:, 3:] - b[:, 3:]).max()) > 1e-3


def test_param_and_cache_logical_axes(model):
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim, (path, names)
  state, _, prefill, _ = _jitted(model)
  _, cache = prefill(state, INPUTS, TARGETS.shape[1])
  axes = model.cache_logical_axes(cache)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda n: isinstance(n, tuple))
  flat_cache, treedef = jax.tree.flatten(cache)
  assert jax.tree.structure(axes, is_leaf=lambda n: isinstance(n, tuple)) == treedef
  for names, leaf in zip(flat_axes, flat_cache):
    assert len(names) == leaf.ndim and names[0] == "cache_batch"
  # On a 2x2x2 (data, fsdp, tensor) mesh: training splits weights over fsdp on their embed
  # axis, sampling keeps them whole there; the cache's 4 rows split over data x fsdp.
  layout, params, checked = mesh_layout(2, 2, 2), nnx.state(model, nnx.Param), 0
  for sampling in (False, True):
    shardings = layout.state_shardings(params, sampling=sampling)
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(params),
                                          nnx.to_flat_state(shardings)):
      names, shape = var.get_metadata()["out_sharding"], var.get_value().shape
      split = sharding.get_value().shard_shape(shape)
      for dim, name in enumerate(names):
        if name == "embed" and shape[dim] % 2 == 0:
          assert split[dim] == shape[dim] // (1 if sampling else 2), (path, sampling)
          checked += 1
  assert checked > 0
  for sharding, leaf in zip(jax.tree.leaves(layout.tree_shardings(cache, axes, sampling=True)),
                            flat_cache):
    assert sharding.shard_shape(leaf.shape)[0] == 1  # 4 cache rows on 4 batch shards.
    assert jax.device_put(leaf, sharding).sharding == sharding


def test_t5x_parameter_names():
  model = abstract_model(get_preset("tiny"))
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ("token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
               "encoder/layers_1/attention/query/kernel", "encoder/layers_0/mlp/wi_1/kernel",
               "encoder/layers_0/pre_attention_layer_norm/scale", "encoder/encoder_norm/scale",
               "decoder/relpos_bias/rel_embedding",
               "decoder/layers_1/encoder_decoder_attention/out/kernel",
               "decoder/layers_0/pre_cross_attention_layer_norm/scale",
               "decoder/decoder_norm/scale", "decoder/logits_dense/kernel"):
    assert name in paths, name
  model = abstract_model(get_preset("tiny_decoder"))
  kernel = model.layers_1.attention.k_proj.kernel
  assert kernel.get_value().shape == (32, 2, 16)
  assert kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "kv")
  tied = abstract_model(get_preset("tiny_decoder", tie_embeddings=True))
  assert count_params(model) - count_params(tied) == 32 * 260


def test_preset_param_counts():
  counts = {name: count_params(abstract_model(config)) for name, config in PRESETS.items()}
  print("param counts:", counts)
  # tiny by hand: embed 8320 + logits 8320 + 2 relpos 128 + 2 enc layers (4096 + 6144 + 64)
  # + 2 dec layers (8192 + 6144 + 96) + 2 final norms 64.
  assert counts["tiny"] == 8320 * 2 + 128 + 2 * 10304 + 2 * 14432 + 64
  assert 1.0e9 < counts["decoder_1b"] < 1.2e9
  assert 6e7 < counts["wmt_base"] < 1e8


def test_get_preset_errors_and_overrides():
  assert get_preset("tiny", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(RestJaxError, match="tiny_decoder"):
    get_preset("huge")
  with pytest.raises(RestJaxError, match="num_layers"):
    get_preset("tiny", num_layers=3)
  with pytest.raises(RestJaxError, match="num_kv_heads"):
    build_model(get_preset("tiny", num_kv_heads=1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_activations(name):
  model = abstract_model(get_preset(name, dtype="bfloat16"))
  graphdef, state = nnx.split(model)

  def run(state):
    model = nnx.merge(graphdef, state)
    return model(INPUTS, TARGETS), model.prefill(INPUTS, 3)[1]

  logits, cache = jax.eval_shape(run, state)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 5, 260)
  assert {leaf.dtype for leaf in jax.tree.leaves(cache["layers"])} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


def test_sharded_equals_unsharded(model):
  layout = mesh_layout(2, 2, 2)
  state, forward, prefill, decode = _jitted(model)
  shardings = layout.state_shardings(state)
  sharded = jax.device_put(state, shardings)
  if model.config.kind == "encdec":
    kernel = sharded["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  else:
    kernel = sharded["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  inputs = jax.device_put(INPUTS, layout.batch_sharding(INPUTS.shape))
  targets = jax.device_put(TARGETS, layout.batch_sharding(TARGETS.shape))
  reference = forward(state, INPUTS, TARGETS)
  np.testing.assert_allclose(forward(sharded, inputs, targets), reference, atol=1e-5, rtol=0)
  # Prefill, then one decode step on a cache sharded by its logical axes (sampling rules).
  graphdef = nnx.graphdef(model)

  @jax.jit
  def prefill_and_step(state, inputs, targets):
    model = nnx.merge(graphdef, state)
    _, cache = model.prefill(inputs, targets.shape[1])
    cache = jax.lax.with_sharding_constraint(
        cache, layout.tree_shardings(cache, model.cache_logical_axes(cache), sampling=True))
    return model.decode_step(targets[:, 0], cache, jnp.int32(0))

  logits, cache = prefill_and_step(sharded, inputs, targets)
  np.testing.assert_allclose(logits, reference[:, 1], atol=1e-5, rtol=0)
  assert cache["layers"][0][next(iter(cache["layers"][0]))].sharding.spec[0] == ("data", "fsdp")
