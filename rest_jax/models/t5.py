"""Encoder-decoder Transformer of the T5.1.1 family, with t5x parameter names and conventions.

Parameter tree (maps 1:1 onto a T5X checkpoint; t5x stores attention kernels flattened as
`[embed, heads * kv]` / `[heads * kv, embed]`, ours are `[embed, heads, kv]` / `[heads, kv, embed]`,
so an importer reshapes them):

  token_embedder.embedding                                  [vocab, embed]
  encoder.relpos_bias.rel_embedding                         [heads, relpos_buckets]
  encoder.layers_{i}.pre_attention_layer_norm.scale         [embed]
  encoder.layers_{i}.attention.{query,key,value}.kernel     [embed, heads, kv]
  encoder.layers_{i}.attention.out.kernel                   [heads, kv, embed]
  encoder.layers_{i}.pre_mlp_layer_norm.scale, mlp.{wi_0,wi_1,wo}.kernel
  encoder.encoder_norm.scale
  decoder.relpos_bias.rel_embedding (causal buckets)
  decoder.layers_{i}.{pre_self_attention_layer_norm, self_attention,
                      pre_cross_attention_layer_norm, encoder_decoder_attention,
                      pre_mlp_layer_norm, mlp}
  decoder.decoder_norm.scale, decoder.logits_dense.kernel   [embed, vocab]

With ``scan_layers`` each ``layers_{i}`` family is one stacked ``layers`` module with a leading
`[layers]` axis (``encoder.layers.attention.query.kernel`` `[layers, embed, heads, kv]`; see
``models.stack``).

Attention logits are not scaled by 1/sqrt(head_dim): as in t5x, that factor is folded into the
initialisation of the query kernel. The decoder input is ``targets`` shifted right with start
token 0; decoder self-attention is causal only (no target padding mask), so teacher-forced
logits equal the step-by-step decode at every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models.base import PAD_ID, Cache, ModelConfig, Segments
from rest_jax.models.layers import (Dense, Embed, RMSNorm, activation_dtypes,
                                    dot_product_attention, make_param, pad_length,
                                    relative_position_bucket, write_cache)
from rest_jax.models.stack import build_layers, layer_at, run_layers

KV = tuple[jax.Array, jax.Array]

_CACHE_AXES = {
    "self_k": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),
    "self_v": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),
    "cross_k": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),
    "cross_v": ("cache_batch", "cache_sequence", "cache_heads", "cache_kv"),
    "encoder_mask": ("cache_batch", "cache_sequence"),
}


class Attention(nnx.Module):
  """t5x multi-head attention: query/key/value `[embed, heads, kv]`, out `[heads, kv, embed]`."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, h, d = config.d_model, config.num_heads, config.head_dim
    kw = activation_dtypes(config)
    names = ("embed", "heads", "kv")
    self.query = Dense((e,), (h, d), names, rngs=rngs, init_scale=1.0 / d,
                       distribution="normal", **kw)
    self.key = Dense((e,), (h, d), names, rngs=rngs, distribution="normal", **kw)
    self.value = Dense((e,), (h, d), names, rngs=rngs, distribution="normal", **kw)
    self.out = Dense((h, d), (e,), ("heads", "kv", "embed"), rngs=rngs,
                     distribution="normal", **kw)

  def key_value(self, x: jax.Array) -> KV:
    """`[batch, len, embed]` -> keys and values, each `[batch, len, heads, kv]`."""
    return self.key(x), self.value(x)

  def __call__(self, x: jax.Array, kv: KV, *, mask: jax.Array | None,
               bias: jax.Array | None = None) -> jax.Array:
    """Attends `[batch, q_len, embed]` queries to ``kv``; returns `[batch, q_len, embed]`."""
    out = dot_product_attention(self.query(x), kv[0], kv[1], mask=mask, bias=bias)
    return self.out(out)


class MlpBlock(nnx.Module):
  """Gated-GELU MLP: ``wo(gelu(wi_0 x) * wi_1 x)`` (tanh-approximate GELU)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, m = config.d_model, config.mlp_dim
    kw = activation_dtypes(config)
    self.wi_0 = Dense((e,), (m,), ("embed", "mlp"), rngs=rngs, **kw)
    self.wi_1 = Dense((e,), (m,), ("embed", "mlp"), rngs=rngs, **kw)
    self.wo = Dense((m,), (e,), ("mlp", "embed"), rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., embed]` -> `[..., embed]`."""
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class RelativePositionBias(nnx.Module):
  """T5 relative position biases, one table `[heads, relpos_buckets]` shared by all layers."""

  def __init__(self, config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    self.bidirectional = bidirectional
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    self.rel_embedding = make_param(
        rngs, jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (config.num_heads, self.num_buckets), names=("heads", "relpos_buckets"),
        dtype=jnp.dtype(config.param_dtype))

  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """int `[q_len]`, `[k_len]` -> float32 bias `[heads, q_len, k_len]`."""
    buckets = relative_position_bucket(
        key_positions[None, :] - query_positions[:, None], bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.take(self.rel_embedding.get_value().astype(jnp.float32), buckets, axis=1)


class EncoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    kw = activation_dtypes(config)
    self.pre_attention_layer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.attention = Attention(config, rngs=rngs)
    self.pre_mlp_layer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = MlpBlock(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array) -> jax.Array:
    """`[batch, len, embed]` -> `[batch, len, embed]`."""
    h = self.pre_attention_layer_norm(x)
    x = x + self.attention(h, self.attention.key_value(h), mask=mask, bias=bias)
    return x + self.mlp(self.pre_mlp_layer_norm(x))


class Encoder(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.num_layers = config.num_encoder_layers
    self.scan = config.scan_layers
    self.relpos_bias = RelativePositionBias(config, bidirectional=True, rngs=rngs)
    build_layers(self, lambda: EncoderLayer(config, rngs=rngs), self.num_layers, scan=self.scan)
    self.encoder_norm = RMSNorm(config.d_model, eps=config.norm_eps,
                                **activation_dtypes(config))

  def __call__(self, x: jax.Array, input_mask: jax.Array, *, remat: str = "none",
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Embedded inputs `[batch, len, embed]`, bool mask `[batch, len]` -> `[batch, len, embed]`.

    ``remat``: the per-layer remat policy (``stack.REMAT_POLICIES``); ``segment_ids`` int
    `[batch, len]` (packed rows): a token attends to its own segment only."""
    positions = jnp.arange(x.shape[1])
    bias = self.relpos_bias(positions, positions)
    mask = input_mask[:, None, :]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    x, _ = run_layers(self, lambda layer, h: (layer(h, mask=mask, bias=bias), None), x,
                      num=self.num_layers, scan=self.scan, remat=remat)
    return self.encoder_norm(x)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    kw = activation_dtypes(config)
    self.pre_self_attention_layer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.self_attention = Attention(config, rngs=rngs)
    self.pre_cross_attention_layer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.encoder_decoder_attention = Attention(config, rngs=rngs)
    self.pre_mlp_layer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = MlpBlock(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, cross_kv: KV, cross_mask: jax.Array,
               self_mask: jax.Array, self_bias: jax.Array, self_cache: KV | None = None,
               slot: jax.Array | None = None) -> tuple[jax.Array, KV]:
    """One decoder layer on `[batch, q_len, embed]`.

    Without ``self_cache`` the keys are the ``q_len`` inputs themselves; with it
    (`[batch, max_decode_len, heads, kv]` each) this step's keys and values are written at
    ``slot`` and attention reads the whole cache. Returns the output and the (updated) keys
    and values.
    """
    h = self.pre_self_attention_layer_norm(x)
    k, v = self.self_attention.key_value(h)
    if self_cache is not None:
      k, v = write_cache(self_cache[0], k, slot), write_cache(self_cache[1], v, slot)
    x = x + self.self_attention(h, (k, v), mask=self_mask, bias=self_bias)
    h = self.pre_cross_attention_layer_norm(x)
    x = x + self.encoder_decoder_attention(h, cross_kv, mask=cross_mask)
    return x + self.mlp(self.pre_mlp_layer_norm(x)), (k, v)


class Decoder(nnx.Module):
  """Decoder layers, final norm and output layer; ``T5Model`` runs the layers."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.num_layers = config.num_decoder_layers
    self.scan = config.scan_layers
    self.relpos_bias = RelativePositionBias(config, bidirectional=False, rngs=rngs)
    build_layers(self, lambda: DecoderLayer(config, rngs=rngs), self.num_layers, scan=self.scan)
    self.decoder_norm = RMSNorm(config.d_model, eps=config.norm_eps,
                                **activation_dtypes(config))
    self.logits_dense = Dense((config.d_model,), (config.vocab_size,), ("embed", "vocab"),
                              rngs=rngs, dtype=jnp.float32,
                              param_dtype=jnp.dtype(config.param_dtype))

  def layer(self, i: int) -> DecoderLayer:
    return layer_at(self, i, scan=self.scan)

  def logits(self, x: jax.Array) -> jax.Array:
    """`[batch, q_len, embed]` -> float32 logits `[batch, q_len, vocab]`."""
    return self.logits_dense(self.decoder_norm(x))

  def __call__(self, x: jax.Array, *, encoded: jax.Array, cross_mask: jax.Array,
               self_mask: jax.Array, self_bias: jax.Array, keep_kv: bool,
               remat: str = "none") -> tuple[jax.Array, list[tuple[KV, KV] | None]]:
    """Embedded decoder inputs `[batch, q_len, embed]` (no cache) -> float32 logits
    `[batch, q_len, vocab]`, attending to ``encoded`` `[batch, input_len, embed]`.

    Each layer computes its cross-attention keys/values from ``encoded``. Returns the logits
    and, when ``keep_kv``, every layer's (self K,V, cross K,V) for a decode cache.
    """

    def body(layer, h):
      cross_kv = layer.encoder_decoder_attention.key_value(encoded)
      h, self_kv = layer(h, cross_kv=cross_kv, cross_mask=cross_mask, self_mask=self_mask,
                         self_bias=self_bias)
      return h, ((self_kv, cross_kv) if keep_kv else None)

    x, kvs = run_layers(self, body, x, num=self.num_layers, scan=self.scan, remat=remat)
    return self.logits(x), kvs

  def decode(self, x: jax.Array, *, query_positions: jax.Array, key_positions: jax.Array,
             self_mask: jax.Array, cross_kvs: list[KV], cross_mask: jax.Array,
             self_caches: list[KV], slot: jax.Array) -> tuple[jax.Array, list[KV]]:
    """One step `[batch, 1, embed]` on the caches, layer by layer (each cache updated in
    place); returns float32 logits `[batch, 1, vocab]` and the updated self K,V per layer."""
    bias = self.relpos_bias(query_positions, key_positions)
    new_kvs = []
    for i in range(self.num_layers):
      x, kv = self.layer(i)(
          x, cross_kv=cross_kvs[i], cross_mask=cross_mask, self_mask=self_mask,
          self_bias=bias, self_cache=self_caches[i], slot=slot)
      new_kvs.append(kv)
    return self.logits(x), new_kvs


class T5Model(nnx.Module):
  """Encoder-decoder SequenceModel (T5.1.1); see the module docstring for the parameter tree."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.kind != "encdec":
      raise RestJaxError(f"T5Model needs ModelConfig.kind='encdec', got {config.kind!r}.")
    if config.num_kv_heads != config.num_heads:
      raise RestJaxError(
          f"the encoder-decoder family uses full multi-head attention, but num_kv_heads="
          f"{config.num_kv_heads} != num_heads={config.num_heads}; set num_kv_heads="
          f"{config.num_heads}.")
    self.config = config
    kw = activation_dtypes(config)
    self.token_embedder = Embed(config.vocab_size, config.d_model, rngs=rngs, **kw)
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  def _encode(self, inputs: jax.Array, remat: str = "none",
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inputs `[batch, input_len]` -> encoded `[batch, input_len, embed]` and the bool mask."""
    input_mask = inputs != PAD_ID if segment_ids is None else segment_ids != 0
    encoded = self.encoder(self.token_embedder(inputs), input_mask, remat=remat,
                           segment_ids=segment_ids)
    return encoded, input_mask

  def __call__(self, inputs: jax.Array, targets: jax.Array,
               segments: Segments | None = None) -> jax.Array:
    """Teacher-forced float32 logits `[batch, target_len, vocab]` (see SequenceModel).

    Packed rows (``segments``, t5x's convention): the encoder and the decoder attend within a
    segment, decoder segment k reads encoder segment k, and each segment's decoder input is
    its own targets shifted right with start token 0. Relative position biases stay
    column-based as in t5x: for two tokens of one (contiguous) segment, the column difference
    is the difference of their per-segment positions, and other pairs are masked.
    """
    remat = self.config.remat_policy
    in_seg = None if segments is None else segments.inputs_segment_ids
    encoded, input_mask = self._encode(inputs, remat, in_seg)
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)
    positions = jnp.arange(targets.shape[1])
    self_mask = (positions[None, :] <= positions[:, None])[None]
    cross_mask = input_mask[:, None, :]
    if segments is not None:
      seg = segments.targets_segment_ids
      previous = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
      decoder_inputs = jnp.where(previous == seg, decoder_inputs, PAD_ID)
      self_mask = self_mask & (seg[:, :, None] == seg[:, None, :])
      cross_mask = cross_mask & (seg[:, :, None] == in_seg[:, None, :])
    logits, _ = self.decoder(
        self.token_embedder(decoder_inputs), encoded=encoded, cross_mask=cross_mask,
        self_mask=self_mask, self_bias=self.decoder.relpos_bias(positions, positions),
        keep_kv=False, remat=remat)
    return logits

  def prefill(self, inputs: jax.Array, max_decode_len: int,
              repeats: int = 1) -> tuple[jax.Array, Cache]:
    """Encodes each prompt once; returns logits `[batch * repeats, vocab]` for
    ``targets[:, 0]`` and the cache of ``repeats`` decoded rows per prompt (row ``b * repeats +
    n`` is prompt b).

    Cache: per prompt, ``encoder_mask`` bool `[batch, input_len]` and per decoder layer
    ``cross_k``, ``cross_v`` `[batch, input_len, heads, kv]` (shared by the prompt's rows);
    per row, ``self_k``, ``self_v`` `[batch * repeats, max_decode_len, heads, kv]` (slot ``t``
    holds decoder position ``t``).
    """
    encoded, input_mask = self._encode(inputs)
    start = jnp.full((inputs.shape[0], 1), PAD_ID, jnp.int32)
    zero = jnp.zeros((1,), jnp.int32)
    logits, kvs = self.decoder(
        self.token_embedder(start), encoded=encoded, cross_mask=input_mask[:, None, :],
        self_mask=jnp.ones((1, 1, 1), bool), self_bias=self.decoder.relpos_bias(zero, zero),
        keep_kv=True)
    rows = lambda x: jnp.repeat(pad_length(x, max_decode_len), repeats, axis=0)
    layers = [{"self_k": rows(sk), "self_v": rows(sv), "cross_k": ck, "cross_v": cv}
              for (sk, sv), (ck, cv) in kvs]
    return (jnp.repeat(logits[:, 0], repeats, axis=0),
            {"encoder_mask": input_mask, "layers": layers})

  def decode_step(self, tokens: jax.Array, cache: Cache,
                  index: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds ``targets[:, index]`` `[rows]` at decoder position ``index + 1``; each row
    attends to its prompt's encoder output (``prefill``'s cache, shared by ``repeats`` rows).

    Returns logits `[rows, vocab]` for ``targets[:, index + 1]`` and the updated cache.
    """
    layers = cache["layers"]
    max_len = layers[0]["self_k"].shape[1] if layers else 1
    slot = jnp.asarray(index, jnp.int32) + 1
    key_positions = jnp.arange(max_len)
    logits, self_kvs = self.decoder.decode(
        self.token_embedder(tokens[:, None]), query_positions=slot[None],
        key_positions=key_positions, self_mask=(key_positions <= slot)[None, None, :],
        cross_kvs=[(c["cross_k"], c["cross_v"]) for c in layers],
        cross_mask=cache["encoder_mask"][:, None, :],
        self_caches=[(c["self_k"], c["self_v"]) for c in layers], slot=slot)
    new_layers = [dict(c, self_k=k, self_v=v) for c, (k, v) in zip(layers, self_kvs)]
    return logits[:, 0], {"encoder_mask": cache["encoder_mask"], "layers": new_layers}

  def cache_logical_axes(self, cache: Cache) -> Cache:
    """Logical axis names for every cache leaf (same tree structure as ``cache``)."""
    return {"encoder_mask": _CACHE_AXES["encoder_mask"],
            "layers": [{name: _CACHE_AXES[name] for name in layer} for layer in cache["layers"]]}
