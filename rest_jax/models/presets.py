"""Named model sizes. ``get_preset("wmt_base", dtype="bfloat16")`` returns a ModelConfig.

Encoder-decoder sizes follow the ReST paper's machine-translation models (T5.1.1 family,
32128-token SentencePiece vocabulary); "tiny"/"small" use a 260-token byte vocabulary for
tests and CPU experiments. Parameter counts (untied, float32) are listed next to each preset.
"""

from __future__ import annotations

import dataclasses

from rest_jax.errors import RestJaxError
from rest_jax.models.base import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Tests: 66,304 parameters.
    "tiny": ModelConfig(kind="encdec", vocab_size=260, d_model=32, num_heads=2, num_kv_heads=2,
                        head_dim=16, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2),
    # Tests: 41,376 parameters.
    "tiny_decoder": ModelConfig(kind="decoder", vocab_size=260, d_model=32, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=0,
                                num_decoder_layers=2),
    # CPU experiments: 1,248,640 parameters.
    "small": ModelConfig(kind="encdec", vocab_size=260, d_model=128, num_heads=4,
                         num_kv_heads=4, head_dim=32, mlp_dim=256, num_encoder_layers=3,
                         num_decoder_layers=3),
    # CPU experiments: 854,144 parameters.
    "small_decoder": ModelConfig(kind="decoder", vocab_size=260, d_model=128, num_heads=4,
                                 num_kv_heads=2, head_dim=32, mlp_dim=384, num_encoder_layers=0,
                                 num_decoder_layers=4),
    # ReST paper, IWSLT 2014 De-En ("tiny" there): 6+6 layers, 4 heads x 128: 70.7M parameters.
    "iwslt_tiny": ModelConfig(kind="encdec", vocab_size=32128, d_model=512, num_heads=4,
                              num_kv_heads=4, head_dim=128, mlp_dim=1024, num_encoder_layers=6,
                              num_decoder_layers=6),
    # ReST paper, WMT 2020 Zh-En ("base" there): 6+6 layers, 8 heads x 64;
    # 89.5M parameters.
    "wmt_base": ModelConfig(kind="encdec", vocab_size=32128, d_model=512, num_heads=8,
                            num_kv_heads=8, head_dim=64, mlp_dim=2048, num_encoder_layers=6,
                            num_decoder_layers=6),
    # A decoder-only model of similar size to "wmt_base": 70.7M parameters.
    "decoder_base": ModelConfig(kind="decoder", vocab_size=32128, d_model=512, num_heads=8,
                                num_kv_heads=4, head_dim=64, mlp_dim=1536, num_encoder_layers=0,
                                num_decoder_layers=12),
    # About 1B parameters: 1,138,296,832 (untied).
    "decoder_1b": ModelConfig(kind="decoder", vocab_size=32128, d_model=2048, num_heads=16,
                              num_kv_heads=8, head_dim=128, mlp_dim=8192, num_encoder_layers=0,
                              num_decoder_layers=16),
    # Llama 3 8B shape (Meta-Llama-3-8B config.json): 8,030,261,248 parameters (untied).
    "llama3_8b": ModelConfig(kind="decoder", vocab_size=128256, d_model=4096, num_heads=32,
                             num_kv_heads=8, head_dim=128, mlp_dim=14336, num_encoder_layers=0,
                             num_decoder_layers=32, rope_theta=500000.0, norm_eps=1e-5),
    # T5.1.1 XL shape (google/t5-v1_1-xl): 24+24 layers, 32 heads x 64, d_ff 5120;
    # 2,849,757,184 parameters.
    "t5_xl": ModelConfig(kind="encdec", vocab_size=32128, d_model=2048, num_heads=32,
                         num_kv_heads=32, head_dim=64, mlp_dim=5120, num_encoder_layers=24,
                         num_decoder_layers=24),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset ``name`` with fields replaced, e.g. ``get_preset("tiny", dtype="bfloat16")``."""
  if name not in PRESETS:
    raise RestJaxError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise RestJaxError(f"ModelConfig has no field(s) {unknown}; valid fields: {sorted(fields)}.")
  return dataclasses.replace(PRESETS[name], **overrides)
