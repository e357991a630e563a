"""The one model interface shared by the encoder-decoder and the decoder-only Transformer.

Conventions (both families):
  * token id 0 is padding (and the decoder start token of the encoder-decoder, as in T5);
    ``EOS_ID`` (1) ends a target.
  * ``inputs`` are right-padded prompts ``[batch, input_len]``; ``targets`` are right-padded
    continuations ``[batch, target_len]`` ending with EOS.
  * The decode cache is a plain pytree (dict) of arrays whose leading axis is the batch, so
    the sampler can shard it with ``cache_logical_axes``. ``prefill(inputs, L, repeats=N)``
    builds it for N decoded rows per prompt: the prompt's leaves keep one row per prompt (read
    by its N rows, ``rest_jax.models.attention``), the decoded tokens' leaves have N.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import jax

from rest_jax.errors import RestJaxError

PAD_ID = 0
EOS_ID = 1

Cache = dict[str, Any]
ROPE_SCALING_TYPES = ("none", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters for either model family.

  ``kind`` selects the family: "encdec" (T5.1.1: RMSNorm, relative position buckets,
  gated-GELU MLP, no biases) or "decoder" (Llama: RMSNorm, RoPE, SwiGLU, grouped-query
  attention). ``num_encoder_layers`` is ignored by the decoder-only family.
  """

  kind: Literal["encdec", "decoder"] = "encdec"
  vocab_size: int = 260
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  norm_eps: float = 1e-6  # RMSNorm epsilon (T5: 1e-6; Llama checkpoints: 1e-5 or 1e-6).
  # Decoder-only family only: biases on the q/k/v projections (Qwen2), and RoPE frequency
  # scaling as in HF ``rope_scaling`` ("none", "linear" or "llama3"; see layers.rope_frequencies).
  attention_bias: bool = False
  rope_scaling_type: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  # How the layers run (not the architecture: checkpoints convert between them). scan_layers:
  # one stacked module scanned with jax.lax.scan (compile time independent of depth);
  # remat_policy: per-layer jax.checkpoint while training (models.stack.REMAT_POLICIES).
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    if self.kind not in ("encdec", "decoder"):
      raise RestJaxError(f"model kind {self.kind!r} is unknown; use 'encdec' or 'decoder'.")
    if self.num_heads % self.num_kv_heads:
      raise RestJaxError(f"num_heads={self.num_heads} is not a multiple of "
                         f"num_kv_heads={self.num_kv_heads}.")
    if self.rope_scaling_type not in ROPE_SCALING_TYPES:
      raise RestJaxError(f"rope_scaling_type {self.rope_scaling_type!r} is not supported; use one "
                         f"of {ROPE_SCALING_TYPES}.")
    if self.rope_scaling_type == "llama3" and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise RestJaxError("llama3 RoPE scaling needs 0 < rope_low_freq_factor < "
                         f"rope_high_freq_factor, got {self.rope_low_freq_factor} and "
                         f"{self.rope_high_freq_factor}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise RestJaxError(f"remat_policy {self.remat_policy!r} is not supported; use one of "
                         f"{REMAT_POLICIES}.")
    for name in ("rope_scaling_factor", "rope_original_max_position"):
      if getattr(self, name) <= 0:
        raise RestJaxError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim",
                 "num_decoder_layers", "norm_eps"):
      if getattr(self, name) <= 0:
        raise RestJaxError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")


class Segments(NamedTuple):
  """Where the examples of packed rows lie (seqio ``trim_and_pack`` / t5x names and values).

  A packed row holds several examples one after another: example ``k`` of a row has segment id
  ``k + 1`` on its columns and positions ``0, 1, ...`` restarting at its first column; padding
  has segment id 0. Inputs and targets are packed separately (in the same order): segment ``k``
  of ``targets`` continues segment ``k`` of ``inputs``. Every array is int32 `[batch, length]`.
  """

  inputs_segment_ids: jax.Array
  inputs_positions: jax.Array
  targets_segment_ids: jax.Array
  targets_positions: jax.Array


@runtime_checkable
class SequenceModel(Protocol):
  """What the sampler, the trainer and the evaluator need from a model (Flax NNX module)."""

  config: ModelConfig

  def __call__(self, inputs: jax.Array, targets: jax.Array,
               segments: Segments | None = None) -> jax.Array:
    """Teacher-forced logits.

    Args:
      inputs: int32 `[batch, input_len]`, right-padded prompts (packed rows with ``segments``).
      targets: int32 `[batch, target_len]`, right-padded targets (packed rows with ``segments``).
      segments: None, or the segments of packed rows: attention then stays inside a segment
        (decoder segment k reads input segment k only) and positions restart per segment, so
        each segment's logits are those of its example alone.
    Returns:
      float32 `[batch, target_len, vocab]`: ``logits[:, t]`` scores ``targets[:, t]`` given
      the inputs and ``targets[:, :t]`` (of the same segment when packed).
    """

  def prefill(self, inputs: jax.Array, max_decode_len: int,
              repeats: int = 1) -> tuple[jax.Array, Cache]:
    """Encodes (enc-dec) or prefills (decoder-only) each prompt once.

    Args:
      inputs: int32 `[batch, input_len]`, right-padded prompts.
      max_decode_len: the most target tokens that will be decoded.
      repeats: decoded rows per prompt (row ``b * repeats + n`` is prompt b).
    Returns:
      logits `[batch * repeats, vocab]` for ``targets[:, 0]`` and the decode cache (leading
      axis ``batch`` for the prompt's leaves, ``batch * repeats`` for the decoded rows').
    """

  def decode_step(self, tokens: jax.Array, cache: Cache,
                  index: jax.Array) -> tuple[jax.Array, Cache]:
    """One decode step.

    Args:
      tokens: int32 `[batch]`, the chosen ``targets[:, index]``.
      cache: the cache from ``prefill`` or the previous step.
      index: int32 scalar, the target position of ``tokens`` (0-based).
    Returns:
      logits `[batch, vocab]` for ``targets[:, index + 1]`` and the updated cache.
    """

  def cache_logical_axes(self, cache: Cache) -> Cache:
    """A tree like ``cache`` whose leaves are tuples of logical axis names."""
