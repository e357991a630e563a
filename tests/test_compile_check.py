"""compile_check: the real Grow and Improve steps compiled ahead of time for a topology."""

import importlib.util

import pytest

from rest_jax.parallel import compile_check

from rest_jax.cli import main

from rest_jax.parallel import topology
from rest_jax.config import GrowConfig, ImproveConfig, RunConfig, SamplingConfig, TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.models import get_preset

TINY_PARAMS = 66_304  # presets.py: "tiny" has 66,304 float32 parameters.


def _tiny_config() -> RunConfig:
  return RunConfig(
      model=get_preset("tiny"), input_len=8, target_len=8,
      grow=GrowConfig(sampling=SamplingConfig(num_samples=2, max_decode_len=8, batch_size=4)),
      improve=ImproveConfig(train=TrainConfig(batch_size=8, num_steps=10)))


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
