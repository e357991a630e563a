"""Attention whose keys are shared by several query rows: the N samples of one prompt.

Grow draws N samples per prompt. The prompt's part of the decode cache (the encoder output's
cross-attention keys and values of the encoder-decoder, the prompt's keys and values of the
decoder-only model) is the same for all N rows, so it is stored once per prompt, `[prompts,
...]`, while the generated tokens' keys and values stay per row, `[prompts * N, ...]` (row
``p * N + n`` is prompt p, sample n). A query row ``i`` reads key row ``i // N``: the N rows of
a prompt are folded into its query axis, so one einsum reads each prompt's keys once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large negative attention bias for masked keys (as in t5x): exp() of it underflows to 0.
MASK_VALUE = -1e10


def fold_rows(query: jax.Array, kv_rows: int, mask: jax.Array | None,
              bias: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Folds the query rows of each key row into its query axis.

  Args:
    query: `[rows, q_len, heads, head_dim]`, ``rows = kv_rows * r``.
    kv_rows: the key/value rows; query row ``i`` reads key row ``i // r``.
    mask: bool, broadcastable to `[rows, q_len, k_len]` or `[kv_rows, q_len, k_len]`, or None.
    bias: `[heads, q_len, k_len]` or None.
  Returns:
    query `[kv_rows, r * q_len, heads, head_dim]` (folded position ``n * q_len + q`` is row
    ``p * r + n``, position q), the mask `[kv_rows, r * q_len or 1, k_len]` and the bias
    `[heads, r * q_len, k_len]` to match (None stays None).
  """
  rows, q_len, heads, head_dim = query.shape
  if rows == kv_rows:
    return query, mask, bias
  r = rows // kv_rows
  if r * kv_rows != rows:
    raise ValueError(f"{rows} query rows cannot share {kv_rows} key rows evenly")
  query = query.reshape(kv_rows, r * q_len, heads, head_dim)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)
    if mask.shape[0] == rows and rows > 1:
      mask = jnp.broadcast_to(mask, (rows, q_len, mask.shape[2]))
      mask = mask.reshape(kv_rows, r * q_len, mask.shape[2])
    elif mask.shape[1] != 1:
      mask = jnp.tile(mask, (1, r, 1))
  if bias is not None:
    bias = jnp.tile(bias, (1, r, 1))
  return query, mask, bias


def attention_logits(query: jax.Array, key: jax.Array, *, mask: jax.Array | None,
                     bias: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
  """Masked float32 logits `[batch, kv_heads, groups, q_len, k_len]` of `[batch, q_len, heads,
  head_dim]` queries against `[batch, k_len, kv_heads, head_dim]` keys (same batch)."""
  batch, q_len, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  if scale != 1.0:
    logits = logits * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape(
        (kv_heads, heads // kv_heads) + bias.shape[1:])
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  return logits


def attend(probs: jax.Array, value: jax.Array) -> jax.Array:
  """Probabilities `[batch, kv_heads, groups, q_len, k_len]` times values `[batch, k_len,
  kv_heads, head_dim]` -> `[batch, q_len, heads, head_dim]` in the dtype of ``value``."""
  batch, kv_heads, groups, q_len, _ = probs.shape
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(value.dtype), value)
  return out.reshape(batch, q_len, kv_heads * groups, value.shape[-1])


def _per_row(x: jax.Array, rows: int, q_len: int) -> jax.Array:
  """Folded `[prompts, h, g, r * q_len, k]` -> per row `[rows, h, g, q_len, k]`."""
  prompts, h, g, _, k = x.shape
  r = rows // prompts
  x = x.reshape(prompts, h, g, r, q_len, k).transpose(0, 3, 1, 2, 4, 5)
  return x.reshape(rows, h, g, q_len, k)


def _folded(x: jax.Array, prompts: int) -> jax.Array:
  """The inverse of ``_per_row``."""
  rows, h, g, q_len, k = x.shape
  r = rows // prompts
  x = x.reshape(prompts, r, h, g, q_len, k).transpose(0, 2, 3, 1, 4, 5)
  return x.reshape(prompts, h, g, r * q_len, k)


def prefix_attention(query: jax.Array, prefix: tuple[jax.Array, jax.Array, jax.Array],
                     own: tuple[jax.Array, jax.Array, jax.Array], *,
                     scale: float = 1.0) -> jax.Array:
  """One softmax over a shared prefix (the prompt) and each row's own keys (its samples).

  Equal to ``dot_product_attention`` over the concatenation ``[prefix keys | own keys]`` of
  each row, with the prefix read once per prompt.

  Args:
    query: `[rows, q_len, heads, head_dim]`, ``rows = prompts * r``.
    prefix: keys, values `[prompts, p_len, kv_heads, head_dim]` and a bool mask `[prompts,
      p_len]` (True where a prompt key may be attended to).
    own: keys, values `[rows, k_len, kv_heads, head_dim]` and a bool mask broadcastable to
      `[rows, q_len, k_len]`.
    scale: multiplies the logits.
  Returns:
    `[rows, q_len, heads, head_dim]` in the dtype of the values.
  """
  rows, q_len, heads, head_dim = query.shape
  prefix_k, prefix_v, prefix_mask = prefix
  prompts, p_len = prefix_mask.shape
  folded, _, _ = fold_rows(query, prompts, None)
  shared = attention_logits(folded, prefix_k, mask=prefix_mask[:, None, :], scale=scale)
  own_logits = attention_logits(query, own[0], mask=own[2], scale=scale)
  probs = jax.nn.softmax(jnp.concatenate([_per_row(shared, rows, q_len), own_logits], -1), -1)
  shared_out = attend(_folded(probs[..., :p_len], prompts), prefix_v)
  return shared_out.reshape(rows, q_len, heads, head_dim) + attend(probs[..., p_len:], own[1])
