"""Hugging Face ``config.json`` <-> ModelConfig, and HF tensor names <-> our parameter names.

Supported architectures (anything else raises RestJaxError naming the unsupported option):

  * encoder-decoder: ``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration`` with
    ``feed_forward_proj = "gated-gelu"`` and an untied ``lm_head`` (T5.1.1, Flan-T5, mT5,
    ByT5); HF T5 attention is unscaled like t5x, so the weights map 1:1.
  * decoder-only: ``LlamaForCausalLM`` (Llama 2/3), ``MistralForCausalLM``,
    ``Qwen2ForCausalLM`` (q/k/v biases): SiLU-gated MLP, grouped-query attention, tied or
    untied embeddings, RoPE scaling "linear" or "llama3".

HF stores a linear layer as ``weight [out, in]`` (flattened heads); ours is ``kernel
[*in_shape, *out_shape]`` (e.g. ``[embed, heads, kv]``), so ``kernel = weight.T.reshape``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import numpy as np

from rest_jax.errors import RestJaxError
from rest_jax.models import EOS_ID, PAD_ID, ModelConfig

logger = logging.getLogger("rest_jax")

_T5_TYPES = ("t5", "mt5")
_DECODER_TYPES = ("llama", "mistral", "qwen2")


def _unsupported(what: str) -> RestJaxError:
  return RestJaxError(f"unsupported Hugging Face checkpoint: {what}. rest_jax imports T5.1.1-style "
                      "T5/mT5/ByT5/Flan-T5 (gated-gelu, untied lm_head) and Llama/Mistral/Qwen2 "
                      "(silu, RoPE none/linear/llama3); convert the model to one of these first.")


def _rope_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """RoPE theta and scaling from either ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {}) or params
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  out: dict[str, Any] = {"rope_theta": float(theta)}
  if kind in ("default", None):
    return out
  if kind not in ("linear", "llama3"):
    raise _unsupported(f"rope_scaling type {kind!r} (supported: linear, llama3)")
  out["rope_scaling_type"] = kind
  out["rope_scaling_factor"] = float(scaling["factor"])
  if kind == "llama3":
    out["rope_low_freq_factor"] = float(scaling["low_freq_factor"])
    out["rope_high_freq_factor"] = float(scaling["high_freq_factor"])
    out["rope_original_max_position"] = int(scaling.get(
        "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192)))
  return out


def config_from_hf(cfg: Mapping[str, Any], *, dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of an HF ``config.json`` dict (``dtype`` sets dtype and param_dtype)."""
  model_type = cfg.get("model_type")
  dtypes = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
  if model_type in _T5_TYPES:
    act = cfg.get("feed_forward_proj", "relu")
    if act != "gated-gelu":
      raise _unsupported(f"feed_forward_proj={act!r} (only 'gated-gelu', i.e. T5.1.1 layouts)")
    layers = int(cfg["num_layers"])
    return ModelConfig(
        kind="encdec", vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]),
        num_heads=int(cfg["num_heads"]), num_kv_heads=int(cfg["num_heads"]),
        head_dim=int(cfg["d_kv"]), mlp_dim=int(cfg["d_ff"]), num_encoder_layers=layers,
        num_decoder_layers=int(cfg.get("num_decoder_layers") or layers),
        relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)), **dtypes)
  if model_type in _DECODER_TYPES:
    if cfg.get("hidden_act", "silu") != "silu":
      raise _unsupported(f"hidden_act={cfg.get('hidden_act')!r} (only 'silu')")
    if cfg.get("mlp_bias"):
      raise _unsupported("mlp_bias=true")
    if model_type != "qwen2" and cfg.get("attention_bias"):
      raise _unsupported("attention_bias=true on a Llama (it biases o_proj too; only the "
                         "Qwen2 q/k/v biases are supported)")
    if cfg.get("sliding_window") and (model_type != "qwen2" or cfg.get("use_sliding_window")):
      logger.warning("the checkpoint uses sliding-window attention (window %s); rest_jax attends "
                     "to the whole context, which is identical only for shorter sequences.",
                     cfg["sliding_window"])
    heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        kind="decoder", vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        mlp_dim=int(cfg["intermediate_size"]), num_decoder_layers=int(cfg["num_hidden_layers"]),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), attention_bias=model_type == "qwen2",
        **_rope_fields(cfg), **dtypes)
  raise _unsupported(f"model_type={model_type!r} (supported: {_T5_TYPES + _DECODER_TYPES})")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """An HF ``config.json`` dict that ``transformers`` loads as the same architecture."""
  torch_dtype = "bfloat16" if config.param_dtype == "bfloat16" else "float32"
  common = {"vocab_size": config.vocab_size, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID,
            "torch_dtype": torch_dtype}
  if config.kind == "encdec":
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "d_model": config.d_model, "d_kv": config.head_dim, "d_ff": config.mlp_dim,
            "num_heads": config.num_heads, "num_layers": config.num_encoder_layers,
            "num_decoder_layers": config.num_decoder_layers,
            "relative_attention_num_buckets": config.relative_attention_num_buckets,
            "relative_attention_max_distance": config.relative_attention_max_distance,
            "layer_norm_epsilon": config.norm_eps, "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new", "is_gated_act": True, "dropout_rate": 0.0,
            "tie_word_embeddings": False, "is_encoder_decoder": True,
            "decoder_start_token_id": PAD_ID, **common}
  arch, model_type = (("Qwen2ForCausalLM", "qwen2") if config.attention_bias
                      else ("LlamaForCausalLM", "llama"))
  out = {"architectures": [arch], "model_type": model_type, "hidden_size": config.d_model,
         "intermediate_size": config.mlp_dim, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
         "num_hidden_layers": config.num_decoder_layers, "rms_norm_eps": config.norm_eps,
         "rope_theta": config.rope_theta, "hidden_act": "silu",
         "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
         "mlp_bias": False, "max_position_embeddings": 4096, "bos_token_id": PAD_ID,
         "use_sliding_window": False, **common}
  if config.rope_scaling_type == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling_factor}
  elif config.rope_scaling_type == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": config.rope_scaling_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_position}
  return out


# (our dotted-name pattern, HF name template); {i} is a layer index. Order matters.
_T5_NAMES = [
    (r"token_embedder\.embedding", "shared.weight"),
    (r"(encoder|decoder)\.relpos_bias\.rel_embedding",
     "{0}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"encoder\.layers_(\d+)\.pre_attention_layer_norm\.scale", "encoder.block.{0}.layer.0.layer_norm.weight"),
    (r"encoder\.layers_(\d+)\.attention\.(q|k|v|o)\w*\.kernel", "encoder.block.{0}.layer.0.SelfAttention.{1}.weight"),
    (r"encoder\.layers_(\d+)\.pre_mlp_layer_norm\.scale", "encoder.block.{0}.layer.1.layer_norm.weight"),
    (r"encoder\.layers_(\d+)\.mlp\.(\w+)\.kernel", "encoder.block.{0}.layer.1.DenseReluDense.{1}.weight"),
    (r"encoder\.encoder_norm\.scale", "encoder.final_layer_norm.weight"),
    (r"decoder\.layers_(\d+)\.pre_self_attention_layer_norm\.scale", "decoder.block.{0}.layer.0.layer_norm.weight"),
    (r"decoder\.layers_(\d+)\.self_attention\.(q|k|v|o)\w*\.kernel", "decoder.block.{0}.layer.0.SelfAttention.{1}.weight"),
    (r"decoder\.layers_(\d+)\.pre_cross_attention_layer_norm\.scale", "decoder.block.{0}.layer.1.layer_norm.weight"),
    (r"decoder\.layers_(\d+)\.encoder_decoder_attention\.(q|k|v|o)\w*\.kernel", "decoder.block.{0}.layer.1.EncDecAttention.{1}.weight"),
    (r"decoder\.layers_(\d+)\.pre_mlp_layer_norm\.scale", "decoder.block.{0}.layer.2.layer_norm.weight"),
    (r"decoder\.layers_(\d+)\.mlp\.(\w+)\.kernel", "decoder.block.{0}.layer.2.DenseReluDense.{1}.weight"),
    (r"decoder\.decoder_norm\.scale", "decoder.final_layer_norm.weight"),
    (r"decoder\.logits_dense\.kernel", "lm_head.weight"),  # Or shared.weight: see t5_head.
]
_LLAMA_NAMES = [
    (r"embed\.embedding", "model.embed_tokens.weight"),
    (r"layers_(\d+)\.attention_norm\.scale", "model.layers.{0}.input_layernorm.weight"),
    (r"layers_(\d+)\.attention\.(\w+)\.kernel", "model.layers.{0}.self_attn.{1}.weight"),
    (r"layers_(\d+)\.attention\.(\w+)\.bias", "model.layers.{0}.self_attn.{1}.bias"),
    (r"layers_(\d+)\.mlp_norm\.scale", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"layers_(\d+)\.mlp\.(\w+)\.kernel", "model.layers.{0}.mlp.{1}.weight"),
    (r"final_norm\.scale", "model.norm.weight"),
    (r"lm_head\.kernel", "lm_head.weight"),
]


def hf_name(config: ModelConfig, name: str) -> str:
  """The HF tensor name of our parameter ``name`` (e.g. ``layers_0.mlp.up_proj.kernel``)."""
  for pattern, template in (_T5_NAMES if config.kind == "encdec" else _LLAMA_NAMES):
    match = re.fullmatch(pattern, name)
    if match:
      return template.format(*match.groups())
  raise RestJaxError(f"parameter {name} has no Hugging Face name; the model config is not an "
                     "HF-compatible architecture.")


def t5_head_scale(cfg: Mapping[str, Any]) -> float:
  """The factor T5 applies before ``lm_head``: ``d_model ** -0.5`` for original (tied) T5.

  transformers < 5 scales when ``tie_word_embeddings`` (default true; T5.1.1 configs say
  false); transformers 5 records it as ``scale_decoder_outputs``. Our model has no such
  factor, so an importer folds it into ``logits_dense`` (exact up to float rounding).
  """
  scaled = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True))
  return float(cfg["d_model"]) ** -0.5 if scaled else 1.0


def _in_rank(name: str) -> int:
  """Input rank of a kernel: 2 for attention outputs (`[heads, kv, embed]`), else 1."""
  return 2 if re.search(r"\.(out|o_proj)\.kernel$", name) else 1


def to_ours(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF tensor as our parameter ``name`` of ``shape``."""
  if name.endswith(".kernel"):  # HF weight [out, in] -> kernel [*in, *out].
    return tensor.T.reshape(shape)
  if name.endswith("rel_embedding"):  # HF [buckets, heads] -> ours [heads, buckets].
    return tensor.T.reshape(shape)
  return tensor.reshape(shape)


def to_hf(name: str, array: np.ndarray) -> np.ndarray:
  """Our parameter ``name`` as the HF tensor (inverse of ``to_ours``)."""
  if name.endswith(".kernel"):
    r = _in_rank(name)
    return np.ascontiguousarray(
        array.reshape(math.prod(array.shape[:r]), -1).T)
  if name.endswith("rel_embedding"):
    return np.ascontiguousarray(array.T)
  if name.endswith(".bias"):
    return np.ascontiguousarray(array.reshape(-1))
  return np.ascontiguousarray(array)
