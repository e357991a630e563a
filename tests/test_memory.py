"""The sampler's memory plan: exact cache sizes, the batch it picks, and the early failure."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import os

from rest_jax.config import RunConfig
from rest_jax.grow import memory
from rest_jax.errors import RestJaxError
from rest_jax.models import build_model, get_preset
from rest_jax.grow.sampler import Sampler
from conftest import mesh_layout


def _split(preset: str):
  return nnx.split(build_model(get_preset(preset), rngs=nnx.Rngs(0)))


def test_cache_bytes_per_prompt_encdec_stores_the_encoder_side_once():
  graphdef, params = _split("tiny")
  # Per decoder layer, float32: cross_k, cross_v [8 inputs, 2 heads, 16] once per prompt and
  # self_k, self_v [8 slots, 2, 16] per sample; 2 layers; plus the bool encoder mask [8].
  for n in (1, 4):
    assert memory.cache_bytes_per_prompt(graphdef, params, input_len=8, max_decode_len=8,
                                         num_samples=n) == (
        2 * (2 + 2 * n) * 8 * 32 * 4 + 8, 260)


def test_cache_bytes_per_prompt_decoder_stores_the_prompt_once():
  graphdef, params = _split("tiny_decoder")
  # Per layer, float32: prompt_k, prompt_v [8 inputs, 2 kv heads, 16] once per prompt and
  # k, v [8 slots, 2, 16] per sample; bool prompt mask [8]; int32 prompt length.
  for n in (1, 4):
    assert memory.cache_bytes_per_prompt(graphdef, params, input_len=8, max_decode_len=8,
                                         num_samples=n) == (
        2 * (2 + 2 * n) * 8 * 32 * 4 + 8 + 4, 260)


def _per_prompt(num_samples: int) -> int:
  cache = 2 * (2 + 2 * num_samples) * 8 * 32 * 4 + 8
  row = 4 * 260 * memory.LOGIT_COPIES + 2 * 4 * 8 + 16
  return cache + num_samples * row + 4 * 8


def test_plan_picks_the_largest_batch_that_fits():
  graphdef, params = _split("tiny")
  params_bytes = 66_304 * 4
  plan = memory.plan_sampling(graphdef, params, num_samples=3, input_len=8, max_decode_len=8,
                              requested_batch=64, available_bytes=None)
  assert (plan.batch_size, plan.bytes_per_prompt, plan.params_bytes) == (
      64, _per_prompt(3), params_bytes)
  available = int((params_bytes + 5 * _per_prompt(3)) / 0.9) + 2
  plan = memory.plan_sampling(graphdef, params, num_samples=3, input_len=8, max_decode_len=8,
                              requested_batch=64, available_bytes=available)
  assert (plan.max_prompts, plan.batch_size) == (5, 5)
  plan = memory.plan_sampling(graphdef, params, num_samples=3, input_len=8, max_decode_len=8,
                              requested_batch=4, available_bytes=available)
  assert plan.batch_size == 4
  plan = memory.plan_sampling(graphdef, params, num_samples=3, input_len=8, max_decode_len=8,
                              requested_batch=64, available_bytes=available,
                              num_batch_shards=2)
  assert (plan.max_prompts, plan.batch_size) == (10, 10)


def test_plan_fails_early_with_the_numbers():
  graphdef, params = _split("tiny")
  available = int((66_304 * 4 + _per_prompt(3)) / 0.9) - 100
  with pytest.raises(RestJaxError, match=f"one prompt needs {_per_prompt(3):,} bytes.*"
                     f"{available:,} bytes are available.*Lower SamplingConfig.num_samples"):
    memory.plan_sampling(graphdef, params, num_samples=3, input_len=8, max_decode_len=8,
                         requested_batch=64, available_bytes=available)


def test_sampler_splits_a_batch_that_does_not_fit_into_calls_with_the_same_samples():
  graphdef, params = _split("tiny")
  layout = mesh_layout(devices=jax.devices()[:1])
  inputs = np.random.default_rng(0).integers(2, 260, (5, 8)).astype(np.int32)
  ids = np.arange(10, 15)
  whole = Sampler(graphdef, layout, num_samples=2, max_decode_len=8, batch_size=5,
                  memory_bytes=10**12)
  tight = Sampler(graphdef, layout, num_samples=2, max_decode_len=8, batch_size=5,
                  memory_bytes=int((66_304 * 4 + 2 * _per_prompt(2)) / 0.9) + 2)
  assert tight.memory_plan(params, 8, 5).batch_size == 2
  a = whole.generate(params, inputs, ids, seed=1, grow_step=0)
  b = tight.generate(params, inputs, ids, seed=1, grow_step=0)
  for name in ("tokens", "logprobs", "lengths", "example_ids", "sample_idx"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert b.tokens.shape == (10, 8)


def test_compile_check_names_the_step_the_excess_and_the_knobs():
  from rest_jax.pipeline import compile_check  # pylint: disable=import-outside-toplevel
  from rest_jax.parallel.topology import parse_topology  # pylint: disable=import-outside-toplevel
  config = RunConfig(model=get_preset("tiny"))
  gib = 2**30
  steps = (compile_check.StepMemory("grow_sample", gib, gib, 0, 0, 0),
           compile_check.StepMemory("improve_train", 10 * gib, 9 * gib, gib, gib, 0))
  result = compile_check.CheckResult(parse_topology("v5e:2x2"), "tpu", {"data": 4}, 1, steps,
                                     knobs=compile_check.knobs(config))
  text = compile_check.format_result(result)
  assert "grow_sample does not fit" not in text
  assert ("improve_train does not fit: 19.000 GiB per device, 3.000 GiB over the 16 GiB of a "
          "v5e chip. Turn ModelConfig.remat_policy (now 'none'") in text
  assert "MeshConfig.fsdp (now 1" in text and "TrainConfig.batch_size (now 64)" in text


def test_run_refuses_before_bc_when_a_step_cannot_fit(tmp_path, monkeypatch, capsys):
  from rest_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  from rest_jax.pipeline import build  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(repo)
  monkeypatch.setattr(build, "device_memory_bytes", lambda devices: 2_000_000)
  base = ["run", "--workdir", str(tmp_path / "w"), "--no_progress", "--gin_file",
          os.path.join(repo, "gin", "experiments", "smoke_cpu.gin")]
  assert cli.main(base + ["--gin.bc/config.TrainConfig.batch_size=4096"]) == 2
  err = capsys.readouterr().err.strip()
  assert "the bc train step cannot fit" in err and "GiB over the" in err
  assert "MeshConfig.fsdp" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "w").exists()
  monkeypatch.setattr(build, "device_memory_bytes", lambda devices: 1000)
  assert cli.main(base) == 2
  assert "Grow sampling does not fit" in capsys.readouterr().err


def test_8b_train_state_bytes_per_device_match_a_hand_count():
  """Llama 3 8B (scanned, float32 master weights) on fsdp 8: each device holds 1/8 of the
  params and of both Adam moments, 3 x 4 bytes x 8,030,261,248 / 8 (plus the step counters)."""
  from rest_jax.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from rest_jax.improve import memory as train_memory  # pylint: disable=import-outside-toplevel
  from rest_jax.improve.losses import bc_loss, plain_loss  # pylint: disable=import-outside-toplevel
  from rest_jax.improve.trainer import Trainer, make_optimizer  # pylint: disable=import-outside-toplevel
  from rest_jax.models import abstract_model, count_params  # pylint: disable=import-outside-toplevel
  config = get_preset("llama3_8b", scan_layers=True, dtype="bfloat16")
  model = abstract_model(config)
  assert count_params(model) == 8_030_261_248
  graphdef, params = nnx.split(model)
  layout = mesh_layout(data=1, fsdp=8, tensor=1)
  state = Trainer(graphdef, layout, plain_loss(bc_loss),
                  make_optimizer(TrainConfig())).abstract_state(params)
  hand = 3 * 4 * 8_030_261_248 // 8
  assert hand <= train_memory.shard_bytes(state) <= hand + 64
  floor = train_memory.train_floor(config, layout, layout.abstract_state(params), moment_dtype="",
                                   batch_size=8, input_len=1024, target_len=1024)
  assert floor.state == hand and floor.grads == hand // 3
  assert floor.logits == 1024 * 128_256 * 4  # One sequence per device, float32 logits.
