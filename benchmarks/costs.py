"""Analytic cost model: parameters touched per token, model FLOPs and the decode roofline.

Counts only matrix parameters (embedding lookups read one row per token and are not FLOPs;
norm scales and relative-position tables are negligible). Attention FLOPs count the full
score matrix that is computed (no causal halving).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from rest_jax.models.base import ModelConfig


def matmul_params(config: ModelConfig) -> dict[str, int]:
  """Matrix parameters applied per token of each stream.

  Returns {"encoder": per input token (T5: encoder layers + the decoder's cross-attention
  key/value projections of the encoder output), "decoder": per generated/target token (layers
  and the output projection), "decode_step": read per decode step (decoder-only: all layers +
  head; T5: decoder layers without cross K/V + head)}.
  """
  e, h, g, d, m, v = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.mlp_dim, config.vocab_size)
  mlp = 3 * e * m
  head = e * v
  if config.kind == "encdec":
    attn = 4 * e * h * d
    cross_kv = 2 * e * h * d
    enc = config.num_encoder_layers * (attn + mlp) + config.num_decoder_layers * cross_kv
    dec = config.num_decoder_layers * (attn + 2 * e * h * d + mlp) + head
    return {"encoder": enc, "decoder": dec, "decode_step": dec}
  layer = 2 * e * h * d + 2 * e * g * d + mlp
  dec = config.num_decoder_layers * layer + head
  return {"encoder": 0, "decoder": dec, "decode_step": dec,
          "layers": config.num_decoder_layers * layer, "head": head}


def train_flops(config: ModelConfig, *, batch: int, input_len: int, target_len: int) -> float:
  """Model FLOPs of one train step (forward + backward = 3 x forward, 2 per multiply-add).

  T5: encoder params x input tokens + decoder params x target tokens + attention
  (encoder P x P, decoder self T x T, cross T x P). Decoder-only: the layers run on
  ``input_len + target_len - 1`` tokens, the output projection on ``target_len``.
  """
  hd = config.num_heads * config.head_dim
  p = matmul_params(config)
  if config.kind == "encdec":
    dense = p["encoder"] * batch * input_len + p["decoder"] * batch * target_len
    attn = 2 * 2 * batch * hd * (config.num_encoder_layers * input_len**2 +
                                 config.num_decoder_layers * (target_len**2 +
                                                              target_len * input_len))
  else:
    seq = input_len + target_len - 1
    dense = p["layers"] * batch * seq + p["head"] * batch * target_len
    attn = 2 * 2 * batch * hd * config.num_decoder_layers * seq**2
  return 3.0 * (2.0 * dense + attn)


def train_tokens(config: ModelConfig, *, batch: int, input_len: int, target_len: int) -> int:
  """Tokens a train step processes: input + target tokens (the sequence for decoder-only)."""
  if config.kind == "encdec":
    return batch * (input_len + target_len)
  return batch * (input_len + target_len - 1)


def grow_roofline(config: ModelConfig, *, prompts: int, rows: int, input_len: int,
                  steps: int, peak_flops: float, bandwidth: float) -> dict[str, float]:
  """Lower bound on the time of prefill + ``steps`` decode steps of ``rows`` sequences.

  Per decode step t (cache length t + 1, plus the prompt for decoder-only): the step's
  weights and the filled KV cache are read once; FLOPs = 2 x step params x rows + attention.
  Step time = max(bytes / bandwidth, flops / peak). Prefill: every weight read once; 2 x
  encoder (T5) or layer (decoder-only) params x prompt tokens, + the decoder (T5) or the
  output projection once per prompt (the prompts are encoded once, not once per sample).
  """
  act_bytes = jnp.dtype(config.dtype).itemsize
  param_bytes = jnp.dtype(config.param_dtype).itemsize
  p = matmul_params(config)
  layers = config.num_decoder_layers
  kv_width = 2 * config.num_kv_heads * config.head_dim  # K and V per token per layer.
  hd = config.num_heads * config.head_dim
  if config.kind == "encdec":  # The encoder on the prompt, the decoder on the start token.
    prefill_params = p["encoder"] + p["decoder"]
    prefill_flops = 2.0 * (p["encoder"] * prompts * input_len + p["decoder"] * prompts)
  else:  # Every layer on the prompt, the output projection on its last position.
    prefill_params = p["decoder"]
    prefill_flops = 2.0 * (p["layers"] * prompts * input_len + p["head"] * prompts)
  total = max(prefill_params * param_bytes / bandwidth, prefill_flops / peak_flops)
  flops_total = prefill_flops
  for t in range(steps):
    if config.kind == "encdec":
      kv_len = (t + 2) + input_len  # self-attention (start token + t + 1) and cross-attention.
    else:
      kv_len = input_len + t + 1
    kv_bytes = rows * layers * kv_width * kv_len * act_bytes
    flops = 2.0 * p["decode_step"] * rows + 2 * 2 * rows * layers * hd * kv_len
    total += max((p["decode_step"] * param_bytes + kv_bytes) / bandwidth, flops / peak_flops)
    flops_total += flops
  return {"roofline_s": total, "flops": flops_total}


def dtype_names(config: ModelConfig) -> dict[str, Any]:
  return {"dtype": config.dtype, "param_dtype": config.param_dtype}
