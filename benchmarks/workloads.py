"""The timed workloads: one Grow ``Sampler.generate`` call and one Improve train step."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from benchmarks import costs
from benchmarks.ceilings import timed
from rest_jax.config import MeshConfig, TrainConfig
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.improve.losses import make_loss
from rest_jax.models import build_model, count_params, get_preset
from rest_jax.models.base import ModelConfig
from rest_jax.grow.sampler import Sampler
from rest_jax.parallel.meshes import layout_from_config

NEVER_EOS = -1  # An eos id no token equals: every row decodes exactly max_decode_len tokens.


def model_config(preset: str, *, dtype: str, param_dtype: str) -> ModelConfig:
  return get_preset(preset, dtype=dtype, param_dtype=param_dtype)


@functools.lru_cache(maxsize=2)
def _model(config: ModelConfig) -> tuple[Any, Any, int]:
  """(graphdef, params state, parameter count) of a randomly initialised model."""
  model = build_model(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return graphdef, params, count_params(model)


def random_tokens(rows: int, length: int, vocab: int, *, seed: int) -> np.ndarray:
  """int32 `[rows, length]` in [2, vocab): no padding, no EOS."""
  return np.random.default_rng(seed).integers(2, vocab, (rows, length), dtype=np.int32)


def grow_call(config: ModelConfig, *, prompts: int, num_samples: int, input_len: int,
              max_decode_len: int, cache_segment: int | None = 32,
              temperature: float = 1.0) -> Callable[[], Any]:
  """One ``Sampler.generate`` call on random prompts, ready to time (returns its output)."""
  graphdef, params, _ = _model(config)
  layout = layout_from_config(MeshConfig(), devices=jax.local_devices()[:1])
  sampler = Sampler(graphdef, layout, num_samples=num_samples, max_decode_len=max_decode_len,
                    temperature=temperature, batch_size=prompts, eos_id=NEVER_EOS,
                    cache_segment=cache_segment)
  params = sampler.place_params(params)
  inputs = random_tokens(prompts, input_len, config.vocab_size, seed=1)
  ids = np.arange(prompts, dtype=np.int64)
  return lambda: sampler.generate(params, inputs, ids, seed=0, grow_step=0)


def grow(config: ModelConfig, *, prompts: int, num_samples: int, input_len: int,
         max_decode_len: int, repeats: int, peak_flops: float, bandwidth: float,
         cache_segment: int | None = 32) -> dict[str, Any]:
  """Times ``Sampler.generate`` (N samples of ``max_decode_len`` tokens for ``prompts`` prompts).

  ``cache_segment`` is the Sampler's (None: the full-length KV cache at every step).

  Returns times, generated tokens/s, prompts/s and the fraction of the roofline reached.
  """
  call = grow_call(config, prompts=prompts, num_samples=num_samples, input_len=input_len,
                   max_decode_len=max_decode_len, cache_segment=cache_segment)
  out = {}

  def run():
    out["last"] = call()

  t = timed(run, repeats=repeats)
  rows = prompts * num_samples
  steps = int(out["last"].num_steps)
  tokens = int(out["last"].lengths.sum())
  roof = costs.grow_roofline(config, prompts=prompts, rows=rows, input_len=input_len,
                             steps=steps, peak_flops=peak_flops, bandwidth=bandwidth)
  return {"params": _model(config)[2], "prompts": prompts, "num_samples": num_samples,
          "rows": rows, "cache_segment": cache_segment,
          "input_len": input_len, "max_decode_len": max_decode_len, "decode_steps": steps,
          "generated_tokens": tokens, "compile_and_first_s": t["first_s"],
          "seconds": t["min_s"], "median_s": t["median_s"],
          "tokens_per_s": tokens / t["min_s"], "prompts_per_s": prompts / t["min_s"],
          "roofline_s": roof["roofline_s"],
          "roofline_fraction": roof["roofline_s"] / t["min_s"],
          "achieved_flops_per_s": roof["flops"] / t["min_s"]}


def train_step_call(config: ModelConfig, *, batch: int, input_len: int,
                    target_len: int) -> Callable[[], None]:
  """One ``Trainer.train_step`` (BC loss, AdamW) on a prefetched random batch, ready to time."""
  graphdef, params, _ = _model(config)
  layout = layout_from_config(MeshConfig(), devices=jax.local_devices()[:1])
  cfg = TrainConfig(learning_rate=1e-4, num_steps=1000)
  trainer = Trainer(graphdef, layout, make_loss(cfg), make_optimizer(cfg))
  holder = {"state": trainer.init(params)}
  targets = random_tokens(batch, target_len, config.vocab_size, seed=2)
  targets[:, -1] = 1  # EOS.
  host_batch = {"inputs": random_tokens(batch, input_len, config.vocab_size, seed=3),
                "targets": targets}
  device_batch = trainer.device_batch(host_batch)  # Prefetched once: the step alone is timed.

  def run():
    holder["state"], metrics = trainer.train_step(holder["state"], device_batch)
    jax.block_until_ready(metrics)

  return run


def improve(config: ModelConfig, *, batch: int, input_len: int, target_len: int,
            repeats: int, peak_flops: float) -> dict[str, Any]:
  """Times ``Trainer.train_step`` (BC loss, AdamW) on a random batch; model FLOPs utilisation."""
  t = timed(train_step_call(config, batch=batch, input_len=input_len, target_len=target_len),
            repeats=repeats)
  flops = costs.train_flops(config, batch=batch, input_len=input_len, target_len=target_len)
  tokens = costs.train_tokens(config, batch=batch, input_len=input_len, target_len=target_len)
  return {"params": _model(config)[2], "batch": batch, "input_len": input_len,
          "target_len": target_len, "tokens": tokens, "compile_and_first_s": t["first_s"],
          "seconds": t["min_s"], "median_s": t["median_s"], "tokens_per_s": tokens / t["min_s"],
          "model_flops": flops, "mfu": flops / t["min_s"] / peak_flops}
