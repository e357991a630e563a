"""Decoder-only Transformer of the Llama family (HF-Llama names and conventions).

Parameter tree:

  embed.embedding                                          [vocab, embed]
  layers_{i}.attention_norm.scale                          [embed]
  layers_{i}.attention.q_proj.kernel                       [embed, heads, kv]
  layers_{i}.attention.{k_proj,v_proj}.kernel              [embed, kv_heads, kv]
  layers_{i}.attention.{q,k,v}_proj.bias  [heads or kv_heads, kv] (only if ``attention_bias``)
  layers_{i}.attention.o_proj.kernel                       [heads, kv, embed]
  layers_{i}.mlp_norm.scale, mlp.{gate_proj,up_proj}.kernel [embed, mlp], down_proj [mlp, embed]
  final_norm.scale, lm_head.kernel [embed, vocab] (absent when ``tie_embeddings``)

With ``scan_layers`` the ``layers_{i}`` are one stacked ``layers`` module whose params have a
leading `[layers]` axis (``layers.attention.q_proj.kernel`` `[layers, embed, heads, kv]`; see
``models.stack``).

Prompts arrive right-padded `[batch, input_len]`; each is left-aligned so that it ends at
column ``input_len - 1`` (its last non-pad token). Pad columns are masked as keys and RoPE
positions count real tokens only (``0 .. prompt_len - 1``), so extra pad columns change
nothing. A prompt with no token at all is treated as the single token 0 (a start token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models.base import PAD_ID, Cache, ModelConfig, Segments
from rest_jax.models.layers import (Dense, Embed, RMSNorm, activation_dtypes, apply_rope,
                                    dot_product_attention, pad_length, rope_frequencies,
                                    write_cache)
from rest_jax.models.attention import prefix_attention
from rest_jax.models.stack import build_layers, layer_at, run_layers

KV = tuple[jax.Array, jax.Array]
Prefix = tuple[jax.Array, jax.Array, jax.Array]  # Shared prompt keys, values and mask.

_KV_AXES = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")


def left_align(inputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Moves each right-padded prompt to the right end of its row.

  Args:
    inputs: int32 `[batch, input_len]`, right-padded prompts.
  Returns:
    ``aligned`` int32 `[batch, input_len]` (prompt ends at column ``input_len - 1``),
    ``valid`` bool `[batch, input_len]` (prompt columns), ``positions`` int32
    `[batch, input_len]` (0 at the first prompt token, 0 on pads) and ``prompt_len`` int32
    `[batch]` (index of the last non-pad token + 1, at least 1).
  """
  input_len = inputs.shape[1]
  columns = jnp.arange(input_len, dtype=jnp.int32)
  prompt_len = jnp.max(jnp.where(inputs != PAD_ID, columns + 1, 0), axis=1)
  prompt_len = jnp.maximum(prompt_len, 1).astype(jnp.int32)
  source = columns[None, :] - (input_len - prompt_len)[:, None]
  valid = source >= 0
  positions = jnp.maximum(source, 0)
  aligned = jnp.where(valid, jnp.take_along_axis(inputs, positions, axis=1), PAD_ID)
  return aligned, valid, positions, prompt_len


class Attention(nnx.Module):
  """Grouped-query attention with RoPE; logits scaled by ``head_dim ** -0.5``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, h, g, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    kw = activation_dtypes(config)
    self.rope_theta = float(config.rope_theta)
    self.inv_freq = (None if config.rope_scaling_type == "none"
                     else tuple(float(f) for f in rope_frequencies(config)))
    self.scale = d ** -0.5
    bias = config.attention_bias
    self.q_proj = Dense((e,), (h, d), ("embed", "heads", "kv"), rngs=rngs, use_bias=bias, **kw)
    self.k_proj = Dense((e,), (g, d), ("embed", "kv_heads", "kv"), rngs=rngs, use_bias=bias,
                        **kw)
    self.v_proj = Dense((e,), (g, d), ("embed", "kv_heads", "kv"), rngs=rngs, use_bias=bias,
                        **kw)
    self.o_proj = Dense((h, d), (e,), ("heads", "kv", "embed"), rngs=rngs, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, *, mask: jax.Array,
               cache: KV | None = None, slot: jax.Array | None = None,
               prefix: Prefix | None = None) -> tuple[jax.Array, KV]:
    """`[batch, q_len, embed]` at RoPE ``positions`` `[batch, q_len]` -> `[batch, q_len, embed]`.

    Without ``cache`` the keys are the inputs themselves; with it (`[batch, cache_len,
    kv_heads, kv]` each) this step's rotated keys and values are written at ``slot`` first.
    ``mask`` is bool `[batch, q_len, k_len]`. ``prefix``: the prompt's keys, values `[prompts,
    input_len, kv_heads, kv]` and mask `[prompts, input_len]`, shared by the ``batch /
    prompts`` rows of each prompt and attended to before the cache (one softmax over both).
    Also returns the (updated) keys and values.
    """
    rope = dict(theta=self.rope_theta, inv_freq=self.inv_freq)
    q = apply_rope(self.q_proj(x), positions, **rope)
    k = apply_rope(self.k_proj(x), positions, **rope)
    v = self.v_proj(x)
    if cache is not None:
      k, v = write_cache(cache[0], k, slot), write_cache(cache[1], v, slot)
    if prefix is None:
      out = dot_product_attention(q, k, v, mask=mask, scale=self.scale)
    else:
      out = prefix_attention(q, prefix, (k, v, mask), scale=self.scale)
    return self.o_proj(out), (k, v)


class Mlp(nnx.Module):
  """SwiGLU: ``down_proj(silu(gate_proj x) * up_proj x)``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, m = config.d_model, config.mlp_dim
    kw = activation_dtypes(config)
    self.gate_proj = Dense((e,), (m,), ("embed", "mlp"), rngs=rngs, **kw)
    self.up_proj = Dense((e,), (m,), ("embed", "mlp"), rngs=rngs, **kw)
    self.down_proj = Dense((m,), (e,), ("mlp", "embed"), rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., embed]` -> `[..., embed]`."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    kw = activation_dtypes(config)
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = Mlp(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, *, mask: jax.Array,
               cache: KV | None = None, slot: jax.Array | None = None,
               prefix: Prefix | None = None) -> tuple[jax.Array, KV]:
    """Pre-norm block on `[batch, q_len, embed]`; returns it and the layer's keys/values."""
    h, kv = self.attention(self.attention_norm(x), positions, mask=mask, cache=cache, slot=slot,
                           prefix=prefix)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv


class LlamaModel(nnx.Module):
  """Decoder-only SequenceModel (Llama); see the module docstring for the parameter tree."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.kind != "decoder":
      raise RestJaxError(f"LlamaModel needs ModelConfig.kind='decoder', got {config.kind!r}.")
    self.config = config
    self.num_layers = config.num_decoder_layers
    kw = activation_dtypes(config)
    # Tied embeddings double as the output layer: start them small so logits start O(1).
    stddev = config.d_model ** -0.5 if config.tie_embeddings else 1.0
    self.embed = Embed(config.vocab_size, config.d_model, rngs=rngs, stddev=stddev, **kw)
    build_layers(self, lambda: Layer(config, rngs=rngs), self.num_layers,
                 scan=config.scan_layers)
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    if not config.tie_embeddings:
      self.lm_head = Dense((config.d_model,), (config.vocab_size,), ("embed", "vocab"),
                           rngs=rngs, dtype=jnp.float32, param_dtype=kw["param_dtype"])

  def _logits(self, x: jax.Array) -> jax.Array:
    """`[..., embed]` -> float32 `[..., vocab]`."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x)

  def _layers(self, x: jax.Array, positions: jax.Array, *, mask: jax.Array,
              caches: list[KV] | None = None, slot: jax.Array | None = None,
              prefixes: list[Prefix] | None = None,
              keep_kv: bool = True) -> tuple[jax.Array, list[KV | None]]:
    """Runs every layer on `[batch, len, embed]`; returns it and each layer's keys/values.

    With ``caches`` (decode) the layers run one by one, each updating its own cache in place;
    without, they run through ``stack.run_layers`` (scanned or not). ``keep_kv=False`` (the
    teacher-forced forward) drops the keys/values and applies the config's remat policy.
    ``prefixes``: each layer's shared prompt keys/values (decode; see ``Attention``).
    """
    scan = self.config.scan_layers
    if caches is not None:
      kvs = []
      for i in range(self.num_layers):
        x, kv = layer_at(self, i, scan=scan)(x, positions, mask=mask, cache=caches[i], slot=slot,
                                             prefix=prefixes[i] if prefixes else None)
        kvs.append(kv)
      return x, kvs

    def body(layer, h):
      h, kv = layer(h, positions, mask=mask)
      return h, (kv if keep_kv else None)

    return run_layers(self, body, x, num=self.num_layers, scan=scan,
                      remat="none" if keep_kv else self.config.remat_policy)

  @staticmethod
  def _causal_mask(valid: jax.Array) -> jax.Array:
    """Key-valid bool `[batch, len]` -> causal mask `[batch, len, len]`."""
    length = valid.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    return causal[None] & valid[:, None, :]

  def _packed_forward(self, inputs: jax.Array, targets: jax.Array,
                      segments: Segments) -> jax.Array:
    """Teacher-forced logits `[batch, target_len, vocab]` of packed rows.

    Runs ``concat(inputs, targets)`` `[batch, input_len + target_len]`: a token attends to the
    earlier columns of its own segment (its prompt, then its targets), with RoPE positions
    ``inputs_positions`` on the prompt and ``prompt_len + targets_positions`` on the targets,
    as its example alone would have. The logits of a segment's first target come from its
    last prompt column (a prompt with no token is packed as the single token 0, as
    ``left_align`` treats it), those of the next targets from the previous target column.
    """
    input_len, target_len = inputs.shape[1], targets.shape[1]
    in_seg, tgt_seg = segments.inputs_segment_ids, segments.targets_segment_ids
    prompt = (tgt_seg[:, :, None] == in_seg[:, None, :]) & (in_seg != 0)[:, None, :]
    prompt_len = prompt.sum(-1).astype(jnp.int32)  # [batch, target_len]
    last_prompt = jnp.max(jnp.where(prompt, jnp.arange(input_len, dtype=jnp.int32), 0), -1)
    tokens = jnp.concatenate([inputs, targets.astype(inputs.dtype)], axis=1)
    seg = jnp.concatenate([in_seg, tgt_seg], axis=1)
    positions = jnp.concatenate(
        [segments.inputs_positions, prompt_len + segments.targets_positions], axis=1)
    columns = jnp.arange(input_len + target_len)
    mask = ((columns[None, :] <= columns[:, None])[None]
            & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, None, :])
    x, _ = self._layers(self.embed(tokens), positions, mask=mask, keep_kv=False)
    source = jnp.where(segments.targets_positions == 0, last_prompt,
                       input_len + jnp.arange(target_len, dtype=jnp.int32) - 1)
    return self._logits(jnp.take_along_axis(x, source[..., None], axis=1))

  def __call__(self, inputs: jax.Array, targets: jax.Array,
               segments: Segments | None = None) -> jax.Array:
    """Teacher-forced float32 logits `[batch, target_len, vocab]` (see SequenceModel).

    Runs ``concat(left-aligned inputs, targets[:, :-1])`` and returns the logits of columns
    ``input_len - 1 ..`` (packed rows: ``_packed_forward``).
    """
    if segments is not None:
      return self._packed_forward(inputs, targets, segments)
    input_len, target_len = inputs.shape[1], targets.shape[1]
    aligned, valid, positions, prompt_len = left_align(inputs)
    tokens = jnp.concatenate([aligned, targets[:, :-1].astype(aligned.dtype)], axis=1)
    valid = jnp.concatenate([valid, jnp.ones_like(targets[:, :-1], bool)], axis=1)
    target_positions = prompt_len[:, None] + jnp.arange(target_len - 1, dtype=jnp.int32)
    positions = jnp.concatenate([positions, target_positions], axis=1)
    x, _ = self._layers(self.embed(tokens), positions, mask=self._causal_mask(valid),
                        keep_kv=False)
    return self._logits(x[:, input_len - 1:])

  def prefill(self, inputs: jax.Array, max_decode_len: int,
              repeats: int = 1) -> tuple[jax.Array, Cache]:
    """Runs each prompt once; returns logits `[batch * repeats, vocab]` for ``targets[:, 0]``
    and the cache of ``repeats`` decoded rows per prompt (row ``b * repeats + n`` is prompt b).

    Cache: per prompt, ``prompt_mask`` bool `[batch, input_len]`, ``prompt_len`` int32
    `[batch]` and per layer ``prompt_k``, ``prompt_v`` `[batch, input_len, kv_heads, kv]`
    (shared by the prompt's rows); per row and layer ``k``, ``v`` `[batch * repeats,
    max_decode_len, kv_heads, kv]` (``targets[:, t]`` in slot ``t``).
    """
    aligned, valid, positions, prompt_len = left_align(inputs)
    x, kvs = self._layers(self.embed(aligned), positions, mask=self._causal_mask(valid))
    rows = inputs.shape[0] * repeats
    empty = lambda x: jnp.zeros((rows, max_decode_len) + x.shape[2:], x.dtype)
    layers = [{"prompt_k": k, "prompt_v": v, "k": empty(k), "v": empty(v)} for k, v in kvs]
    logits = jnp.repeat(self._logits(x[:, -1]), repeats, axis=0)
    return logits, {"layers": layers, "prompt_mask": valid, "prompt_len": prompt_len}

  def decode_step(self, tokens: jax.Array, cache: Cache,
                  index: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds ``targets[:, index]`` `[rows]` (slot ``index``, RoPE position ``prompt_len +
    index``); returns logits `[rows, vocab]` for ``targets[:, index + 1]``. Each row attends
    to its prompt's keys (shared by ``repeats`` rows) and to its own decoded tokens."""
    index = jnp.asarray(index, jnp.int32)
    rows = tokens.shape[0]
    prompt_mask = cache["prompt_mask"]
    repeats = rows // prompt_mask.shape[0]
    decoded = jnp.arange(cache["layers"][0]["k"].shape[1]) <= index
    positions = (jnp.repeat(cache["prompt_len"], repeats) + index)[:, None]
    layers = cache["layers"]
    x, kvs = self._layers(
        self.embed(tokens[:, None]), positions, mask=decoded[None, None, :],
        caches=[(c["k"], c["v"]) for c in layers], slot=index,
        prefixes=[(c["prompt_k"], c["prompt_v"], prompt_mask) for c in layers])
    new_layers = [dict(c, k=k, v=v) for c, (k, v) in zip(layers, kvs)]
    return self._logits(x[:, 0]), dict(cache, layers=new_layers)

  def cache_logical_axes(self, cache: Cache) -> Cache:
    """Logical axis names for every cache leaf (same tree structure as ``cache``)."""
    return {"layers": [{name: _KV_AXES for name in layer} for layer in cache["layers"]],
            "prompt_mask": ("cache_batch", "cache_sequence"),
            "prompt_len": ("cache_batch",)}
