"""Building blocks shared by both model families (Flax NNX; biases only for Qwen2 q/k/v).

Every parameter is an ``nnx.Param`` carrying ``out_sharding`` logical axis names of its rank
(t5x names: vocab, embed, mlp, heads, kv_heads, kv, relpos_buckets); ``rest_jax.parallel.layout``
turns them into shardings. Activations run in the config's ``dtype``, parameters are stored
in ``param_dtype``; attention logits, softmax and normalisation statistics are float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rest_jax.models.attention import attend, attention_logits, fold_rows
from rest_jax.models.base import ModelConfig


def make_param(rngs: nnx.Rngs, init: Any, shape: Sequence[int], *,
               names: Sequence[str | None], dtype: Any) -> nnx.Param:
  """An ``nnx.Param`` initialised with ``init(key, shape, dtype)`` and named logical axes."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match the rank of shape {shape}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


class Dense(nnx.Module):
  """A bias-free linear map over several input and output axes (t5x ``DenseGeneral``).

  The kernel is shaped ``in_shape + out_shape`` (e.g. ``[embed, heads, kv]``) and initialised
  with ``variance_scaling(init_scale, "fan_in", distribution)`` where fan-in is the product of
  the input axes, exactly as t5x does with its flattened kernels.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               names: Sequence[str | None], *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, init_scale: float = 1.0,
               distribution: str = "truncated_normal", use_bias: bool = False):
    self.in_rank = len(in_shape)
    self.use_bias = use_bias
    self.dtype = jnp.dtype(dtype)
    rank = len(in_shape) + len(out_shape)
    init = jax.nn.initializers.variance_scaling(
        init_scale, "fan_in", distribution, in_axis=tuple(range(self.in_rank)),
        out_axis=tuple(range(self.in_rank, rank)))
    self.kernel = make_param(rngs, init, tuple(in_shape) + tuple(out_shape), names=names,
                             dtype=jnp.dtype(param_dtype))
    if use_bias:  # Only the Qwen2 q/k/v projections have one (zero-initialised).
      self.bias = make_param(rngs, jax.nn.initializers.zeros, tuple(out_shape),
                             names=tuple(names)[self.in_rank:], dtype=jnp.dtype(param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., *in_shape]` -> `[..., *out_shape]`, contracting the last ``len(in_shape)`` axes."""
    kernel = self.kernel.get_value().astype(self.dtype)
    x = x.astype(self.dtype)
    lhs = tuple(range(x.ndim - self.in_rank, x.ndim))
    rhs = tuple(range(self.in_rank))
    y = jax.lax.dot_general(x, kernel, ((lhs, rhs), ((), ())))
    if self.use_bias:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `[vocab, embed]`, with ``attend`` for tied output logits."""

  def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs, stddev: float = 1.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    self.dtype = jnp.dtype(dtype)
    self.embedding = make_param(rngs, jax.nn.initializers.normal(stddev),
                                (vocab_size, features), names=("vocab", "embed"),
                                dtype=jnp.dtype(param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int `[...]` -> `[..., embed]` in the activation dtype."""
    return jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Float32 logits `[..., vocab]` of `[..., embed]` against the table."""
    table = self.embedding.get_value().astype(jnp.float32)
    return jnp.einsum("...e,ve->...v", x.astype(jnp.float32), table)


class RMSNorm(nnx.Module):
  """T5 / Llama RMSNorm: ``x / sqrt(mean(x^2) + eps) * scale``; no mean subtraction, no bias."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.eps = float(eps)
    self.dtype = jnp.dtype(dtype)
    self.scale = nnx.Param(jnp.ones((features,), jnp.dtype(param_dtype)),
                           out_sharding=("embed",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., embed]` -> `[..., embed]`; the statistics are computed in float32."""
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale.get_value().astype(self.dtype)


def activation_dtypes(config: ModelConfig) -> dict[str, Any]:
  """``dtype`` / ``param_dtype`` keyword arguments for the layers above."""
  return {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of ``memory_position - query_position`` (t5x ``_relative_position_bucket``).

  Bidirectional: half the buckets for keys after the query. Within a half, distances below
  ``num_buckets // 2`` (of the half) get a bucket each, larger ones share logarithmically
  spaced buckets up to ``max_distance``; everything farther lands in the last bucket.
  Causal (``bidirectional=False``): keys after the query map to bucket 0.

  Args:
    relative_position: int `[...]`, key position minus query position.
  Returns:
    int32 `[...]` in ``[0, num_buckets)``.
  """
  n = -jnp.asarray(relative_position, jnp.int32)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps) /
      math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


def rotate_half(x: jax.Array) -> jax.Array:
  """HF-Llama ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` on the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies float32 `[head_dim / 2]`, scaled as HF ``rope_scaling`` says.

  "none": ``theta ** (-2i / head_dim)``; "linear": divided by ``rope_scaling_factor``;
  "llama3": wavelengths longer than ``original_max / low_freq_factor`` divided by the factor,
  shorter than ``original_max / high_freq_factor`` kept, and smoothly interpolated in between
  (HF ``_compute_llama3_parameters``).
  """
  d = config.head_dim
  inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(
      np.float32)
  factor = np.float32(config.rope_scaling_factor)
  if config.rope_scaling_type == "linear":
    return (inv_freq / factor).astype(np.float32)
  if config.rope_scaling_type == "llama3":
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotary position embedding, HF-Llama convention (pairs ``i`` and ``i + head_dim / 2``).

  Args:
    x: `[batch, length, heads, head_dim]`.
    positions: int `[batch, length]`.
    theta: the RoPE base (``rope_theta``); unused when ``inv_freq`` is given.
    inv_freq: float32 `[head_dim / 2]` (``rope_frequencies``), or None for unscaled RoPE.
  Returns:
    `[batch, length, heads, head_dim]` in the dtype of ``x``; the rotation is float32.
  """
  head_dim = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  return (xf * jnp.cos(angles) + rotate_half(xf) * jnp.sin(angles)).astype(x.dtype)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None, bias: jax.Array | None = None,
                          scale: float = 1.0) -> jax.Array:
  """Multi-head (or grouped-query) attention with float32 logits and softmax.

  Query head ``h`` reads key/value head ``h // (heads // kv_heads)`` (HF ``repeat_kv``). Keys
  and values may have fewer rows than the query, ``rows = kv_rows * r``: query row ``i`` then
  reads key row ``i // r`` (a prompt's keys shared by its N samples; ``attention.fold_rows``).

  Args:
    query: `[rows, q_len, heads, head_dim]`.
    key: `[kv_rows, k_len, kv_heads, head_dim]`.
    value: `[kv_rows, k_len, kv_heads, head_dim]`.
    mask: bool `[rows or kv_rows, q_len, k_len]` (or broadcastable to it): True where a key
      may be attended to; None attends everywhere.
    bias: float `[heads, q_len, k_len]` added to the logits (relative positions), or None.
    scale: multiplies the logits (1.0 for T5, ``head_dim ** -0.5`` for Llama).
  Returns:
    `[rows, q_len, heads, head_dim]` in the dtype of ``value``.
  """
  rows, q_len, heads, head_dim = query.shape
  query, mask, bias = fold_rows(query, key.shape[0], mask, bias)
  logits = attention_logits(query, key, mask=mask, bias=bias, scale=scale)
  out = attend(jax.nn.softmax(logits, axis=-1), value)
  return out.reshape(rows, q_len, heads, head_dim)


def write_cache(cache: jax.Array, update: jax.Array, slot: jax.Array | int) -> jax.Array:
  """Writes ``update`` `[batch, n, ...]` into ``cache`` `[batch, length, ...]` at ``slot``."""
  start = (0, slot) + (0,) * (cache.ndim - 2)
  return jax.lax.dynamic_update_slice(cache, update.astype(cache.dtype), start)


def pad_length(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads axis 1 of `[batch, n, ...]` to `[batch, length, ...]`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)
