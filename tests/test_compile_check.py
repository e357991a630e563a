"""compile_check: the real Grow and Improve steps compiled ahead of time for a topology."""

import dataclasses
import functools
import importlib.util
import math

import jax
import pytest
from flax import nnx

from rest_jax.pipeline import compile_check

from rest_jax.cli import main

from rest_jax.parallel import topology
from rest_jax import models
from rest_jax.config import (GrowConfig, ImproveConfig, MeshConfig, RunConfig, SamplingConfig,
                             TrainConfig)
from rest_jax.errors import RestJaxError
from rest_jax.models import get_preset

TINY_PARAMS = 66_304  # presets.py: "tiny" has 66,304 float32 parameters.


def _tiny_config(loss: str = "bc", mesh: MeshConfig = MeshConfig()) -> RunConfig:
  return RunConfig(
      model=get_preset("tiny"), input_len=8, target_len=8, mesh=mesh,
      grow=GrowConfig(sampling=SamplingConfig(num_samples=2, max_decode_len=8, batch_size=4)),
      improve=ImproveConfig(train=TrainConfig(batch_size=8, num_steps=10, loss=loss)))


def _check_tiny(result: compile_check.CheckResult, devices: int) -> None:
  assert result.topology.devices == devices
  assert result.num_params == TINY_PARAMS
  assert result.mesh_shape == {"data": devices, "fsdp": 1, "tensor": 1}
  grow, improve = result.steps
  assert (grow.step, improve.step) == ("grow_sample", "improve_train")
  # Data parallel: every device holds all params (grow) and params + both Adam moments (improve).
  assert grow.arguments >= TINY_PARAMS * 4
  assert improve.arguments >= 3 * TINY_PARAMS * 4
  for step in result.steps:
    assert step.outputs > 0 and step.total > 0 and result.fits(step)
  table = compile_check.format_result(result)
  rows = {line.split()[0]: line.split() for line in table.splitlines()[4:]}
  assert set(rows) == {"grow_sample", "improve_train"}
  assert rows["improve_train"][-1] == "yes"
  assert float(rows["improve_train"][5]) == pytest.approx(improve.total / 2**30, abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_topology_compiles_both_steps():
  result = compile_check.check(_tiny_config(), "v5e:2x2")
  assert result.mode == "tpu"
  assert result.topology.hbm_bytes == 16 * 2**30
  _check_tiny(result, 4)
  # The train state is donated: XLA:TPU reuses its buffers for the new state.
  assert result.steps[1].aliased >= 3 * TINY_PARAMS * 4


def test_gpu_topology_is_a_cpu_estimate():
  result = compile_check.check(_tiny_config(), "h100:2x4")
  assert result.mode == "cpu-estimate"
  _check_tiny(result, 8)
  assert "ESTIMATE" in compile_check.format_result(result)


def test_topology_parsing_and_errors(capsys):
  t = topology.parse_topology("V5E:16x16")
  assert (t.chip, t.dims, t.devices, t.is_tpu) == ("v5e", (16, 16), 256, True)
  assert topology.parse_topology("a100-80:2x8").hbm_bytes == 80 * 2**30
  assert topology.needed_cpu_devices(["v4:2x2x2", "h200:4x8", "h100:1x8"]) == 32
  for bad in ("v9:2x2", "v5e", "v5e:0x4", "h100:4*8"):
    with pytest.raises(RestJaxError, match="topology"):
      topology.parse_topology(bad)
  with pytest.raises(RestJaxError, match="64 devices"):
    compile_check.check(_tiny_config(), "h100:8x8")  # Only 8 CPU devices in tests.
  code = main.main(["compile-check", "--topology", "v7:2x2", "--gin_file",
                    "gin/experiments/smoke_cpu.gin"])
  assert code == 2 and "is not CHIP:AxB" in capsys.readouterr().err


# Every loss and every rule set, each with a DCN size above 1: h100:2x4 is 2 nodes (granules)
# of 4 GPUs; ICI fsdp=2 x data=2 within a node, DCN data=2 across the nodes.
CASES = [("bc", "data"), ("bc", "fsdp"), ("reward_weighted_bc", "2d"), ("gold", "tensor"),
         ("bvmpo", "fsdp"), ("oac", "data")]


@functools.lru_cache(maxsize=None)
def _check_case(loss: str, rules: str) -> compile_check.CheckResult:
  mesh = MeshConfig(data=-1, fsdp=2, dcn_data=2, rules=rules)
  return compile_check.check(_tiny_config(loss, mesh), "h100:2x4")


@pytest.mark.parametrize("loss,rules", CASES)
def test_every_loss_and_rule_set_with_dcn(loss, rules):
  result = _check_case(loss, rules)
  assert result.mesh_shape == {"data": 4, "fsdp": 2, "tensor": 1}
  names = [s.step for s in result.steps]
  # The run's Improve step: the losses that need a pre-pass compile it too.
  assert names == (["grow_sample", "improve_train"] if loss in ("bc", "reward_weighted_bc")
                   else ["grow_sample", "improve_extras", "improve_train"])
  assert all(s.total > 0 and result.fits(s) for s in result.steps)
  rows = [line.split()[0] for line in compile_check.format_result(result).splitlines()[4:]]
  assert rows == names


def _param_bytes_per_device(fsdp: int, sharded: bool) -> int:
  """Hand count: float32 params; under "fsdp" a weight whose embed axis fsdp divides holds
  1/fsdp of it, under "data" every device holds all of it."""
  state = nnx.state(models.abstract_model(get_preset("tiny")), nnx.Param)
  total = 0
  for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    shape = var.get_value().shape
    names = var.get_metadata().get("out_sharding") or ()
    split = sharded and "embed" in names and shape[names.index("embed")] % fsdp == 0
    total += math.prod(shape) * 4 // (fsdp if split else 1)
  return total


def test_memory_follows_the_runs_rule_set():
  data, fsdp = _check_case("bc", "data"), _check_case("bc", "fsdp")
  assert data.mesh_shape == fsdp.mesh_shape
  train = {r: next(s for s in res.steps if s.step == "improve_train")
           for r, res in (("data", data), ("fsdp", fsdp))}
  # Same batch shards (8) either way; params, Adam mu and nu shrink by the fsdp split.
  replicated, split = _param_bytes_per_device(2, False), _param_bytes_per_device(2, True)
  assert split < replicated
  assert train["data"].arguments - train["fsdp"].arguments == 3 * (replicated - split)
  assert train["data"].arguments >= 3 * replicated


def _with_batch_size(config: RunConfig, batch_size: int) -> RunConfig:
  train = dataclasses.replace(config.improve.train, batch_size=batch_size)
  return dataclasses.replace(config, improve=dataclasses.replace(config.improve, train=train))


def test_clear_errors_for_meshes_that_do_not_fit():
  with pytest.raises(RestJaxError, match="DCN sizes .* do not divide the 2 granules"):
    compile_check.check(_tiny_config(mesh=MeshConfig(dcn_data=4)), "h100:2x4")
  # The run's own start-up check (pipeline.build.resolve), so compile-check refuses what a run
  # would refuse, with the same message.
  with pytest.raises(RestJaxError, match=r"batch_size = 12 is not divisible by the mesh's "
                     r"data-parallel size \(batch shards\), 8"):
    compile_check.check(_with_batch_size(_tiny_config(), 12), "h100:2x4")
  with pytest.raises(RestJaxError, match="unknown loss 'ppo'"):
    compile_check.check(_tiny_config(loss="ppo"), "h100:1x2")


def test_cli_compile_check_with_an_rl_loss(capsys):
  # Was: TypeError: LossFactory.__call__() takes 2 positional arguments but 3 were given.
  code = main.main(["compile-check", "--topology", "h100:1x2", "--gin_file",
                    "gin/experiments/smoke_cpu.gin",
                    "--gin.improve/config.TrainConfig.loss='gold'"])
  out = capsys.readouterr().out
  assert code == 0 and "improve_extras" in out and "improve_train" in out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_dcn_compiles_for_several_slices():
  mesh = MeshConfig(data=-1, dcn_data=2, rules="fsdp")
  result = compile_check.check(_tiny_config("oac", mesh), "v5e:2x2")
  assert result.mode == "tpu" and result.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
  assert [s.step for s in result.steps] == ["grow_sample", "improve_extras", "improve_train"]
