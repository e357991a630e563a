"""What each benchmark profile measures: --quick (smoke test), the CPU default, --gpu."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GrowCase:
  preset: str
  prompts: int
  num_samples: int
  input_len: int
  max_decode_len: int


@dataclasses.dataclass(frozen=True)
class ImproveCase:
  preset: str
  batch: int
  input_len: int
  target_len: int


@dataclasses.dataclass(frozen=True)
class Profile:
  """Sizes of one benchmark run; ``time_budget_s`` skips what would start after it."""

  matmul_sizes: tuple[int, ...]  # The matmul ceiling is the best over these sizes.
  bandwidth_bytes: int
  repeats: int
  grow: tuple[GrowCase, ...]
  improve: tuple[ImproveCase, ...]
  scaling_preset: str
  scaling_prompts: int
  scaling_num_samples: tuple[int, ...]  # Grow time against N at scaling_length.
  scaling_lengths: tuple[int, ...]  # Grow time against output length at N = 4.
  scaling_length: int
  scaling_input_len: int
  scaling_train_batches: tuple[int, ...]  # Improve time against batch tokens.
  hf_preset: str
  hf_batches: tuple[int, ...]
  hf_input_len: int
  hf_new_tokens: int
  time_budget_s: float
  cache_segment: int = 32  # The Sampler's first KV-cache segment (it doubles from there).
  sampling_rows: int = 256  # The sampling draw alone: [rows, vocab] logits.
  sampling_vocab: int = 32128
  hf_temperature: float = 0.8  # Both sides of the sampled transformers comparison.
  t5x_preset: str = "wmt_base"  # The t5x peer runs this preset's Grow and Improve cases.
  # The prompt's cache shared by its N samples against copied (benchmarks.prompt_cache).
  prompt_cache_presets: tuple[str, ...] = ("small", "small_decoder")
  prompt_cache_num_samples: tuple[int, ...] = (4, 16, 64)
  prompt_cache_input_len: int = 256
  prompt_cache_length: int = 32


QUICK = Profile(
    matmul_sizes=(128, 256), bandwidth_bytes=4 << 20, repeats=1,
    grow=(GrowCase("tiny", 2, 2, 8, 8),), improve=(ImproveCase("tiny", 4, 8, 8),),
    scaling_preset="tiny", scaling_prompts=2, scaling_num_samples=(1, 2, 4),
    scaling_lengths=(4, 8, 12), scaling_length=8, scaling_input_len=8,
    scaling_train_batches=(2, 4, 6), hf_preset="tiny_decoder", hf_batches=(2,), hf_input_len=8,
    hf_new_tokens=8, time_budget_s=1e9, cache_segment=4,
    sampling_rows=8, sampling_vocab=512, t5x_preset="tiny",
    prompt_cache_presets=("tiny", "tiny_decoder"), prompt_cache_num_samples=(2,),
    prompt_cache_input_len=8, prompt_cache_length=4)

CPU = Profile(
    matmul_sizes=(1024, 2048, 4096), bandwidth_bytes=256 << 20, repeats=1,
    grow=(GrowCase("wmt_base", 8, 1, 32, 32), GrowCase("wmt_base", 256, 1, 32, 32),
          GrowCase("wmt_base", 32, 8, 32, 32), GrowCase("decoder_base", 8, 1, 32, 32),
          GrowCase("decoder_base", 32, 8, 32, 32)),
    improve=(ImproveCase("wmt_base", 64, 64, 64), ImproveCase("decoder_base", 64, 64, 65)),
    scaling_preset="small", scaling_prompts=4, scaling_num_samples=(1, 2, 4, 8, 16, 32, 64),
    scaling_lengths=(32, 64, 128, 256), scaling_length=32, scaling_input_len=32,
    scaling_train_batches=(8, 16, 32, 64), hf_preset="decoder_base", hf_batches=(8, 256),
    hf_input_len=32, hf_new_tokens=32, time_budget_s=570)

GPU = Profile(
    matmul_sizes=(4096, 8192), bandwidth_bytes=2 << 30, repeats=3,
    grow=(GrowCase("wmt_base", 8, 1, 64, 128), GrowCase("wmt_base", 256, 1, 64, 128),
          GrowCase("wmt_base", 64, 16, 64, 128), GrowCase("decoder_base", 8, 1, 64, 128),
          GrowCase("decoder_base", 256, 1, 64, 128), GrowCase("decoder_1b", 8, 1, 64, 128),
          GrowCase("decoder_1b", 256, 1, 64, 128)),
    improve=(ImproveCase("wmt_base", 256, 64, 64), ImproveCase("decoder_base", 128, 64, 65),
             ImproveCase("decoder_1b", 64, 64, 65)),
    scaling_preset="wmt_base", scaling_prompts=16, scaling_num_samples=(1, 4, 16, 64),
    scaling_lengths=(32, 64, 128, 256), scaling_length=64, scaling_input_len=64,
    scaling_train_batches=(32, 64, 128, 256), hf_preset="decoder_base", hf_batches=(8, 256),
    hf_input_len=64, hf_new_tokens=128, time_budget_s=300, cache_segment=64,
    prompt_cache_presets=("wmt_base", "decoder_base"), prompt_cache_input_len=512,
    prompt_cache_length=64)

PROFILES = {"quick": QUICK, "cpu": CPU, "gpu": GPU}
