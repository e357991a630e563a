"""Mesh configuration (ICI x DCN sizes, named rule sets), start-up batch checks and the
multi-host settings, on 8 fake CPU devices in one process."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rest_jax import config as C
from rest_jax.parallel import distributed
from rest_jax.pipeline import run as pipeline
from rest_jax.cli import main
from rest_jax.parallel import meshes
from rest_jax.errors import RestJaxError
from rest_jax.models import get_preset


def test_resolve_sizes_fills_the_rest_and_rejects_bad_sizes():
  assert meshes.resolve_sizes((-1, 2, 1), 8, "ICI") == (4, 2, 1)
  assert meshes.resolve_sizes((2, 2, 2), 8, "ICI") == (2, 2, 2)
  with pytest.raises(RestJaxError, match="at most one may be -1"):
    meshes.resolve_sizes((-1, -1, 1), 8, "ICI")
  with pytest.raises(RestJaxError, match="do not divide the 8 devices"):
    meshes.resolve_sizes((3, 1, 1), 8, "ICI")
  with pytest.raises(RestJaxError, match="use 4 of the 8"):
    meshes.resolve_sizes((2, 2, 1), 8, "ICI")


def test_hybrid_grid_puts_dcn_outermost_and_ici_within_a_granule():
  # 8 fake devices in 2 granules (e.g. slices) of 4.
  devices = [types.SimpleNamespace(id=i, granule=i // 4) for i in range(8)]
  grid = meshes.device_grid((2, 1, 2), (2, 1, 1), devices, key=lambda d: d.granule)
  assert grid.shape == (4, 1, 2)
  ids = np.vectorize(lambda d: d.id)(grid)
  np.testing.assert_array_equal(ids[:, 0, :], [[0, 1], [2, 3], [4, 5], [6, 7]])
  # DCN over fsdp with -1: the 2 granules split the fsdp axis; ICI data=-1 is the rest (2).
  grid = meshes.device_grid((-1, 1, 2), (1, -1, 1), devices, key=lambda d: d.granule)
  ids = np.vectorize(lambda d: d.id)(grid)
  assert ids.shape == (2, 2, 2)
  np.testing.assert_array_equal(ids[:, 0, :], [[0, 1], [2, 3]])  # Granule 0.
  np.testing.assert_array_equal(ids[:, 1, :], [[4, 5], [6, 7]])  # Granule 1.
  with pytest.raises(RestJaxError, match="do not divide the 2 granules"):
    meshes.device_grid((1, 1, 1), (3, 1, 1), devices, key=lambda d: d.granule)


@pytest.mark.parametrize("mesh,local", [
    ((1, 2, 2, 2), (1, 2, 2)),  # DCN data over 2 hosts: each host keeps fsdp 2 x tensor 2.
    ((2, 1, 4, 1), (1, 4, 1)),  # ICI fsdp 4 within a host.
    ((1, 1, 8, 1), (1, 4, 1)),  # fsdp 8 spans both hosts: cut to the host's 4 devices.
    ((1, 1, 2, 4), (1, 1, 4)),  # tensor first, then fsdp from what is left.
    ((2, -1, 1, 1), (4, 1, 1)),  # Pure data parallel: the local devices are the data axis.
])
def test_host_local_layout_keeps_the_rules_on_this_hosts_devices(monkeypatch, mesh, local):
  # The reward model's mesh with 2 processes of 4 devices (faked): only this host's devices.
  dcn_data, *ici = mesh
  layout = meshes.layout_from_config(C.MeshConfig(*ici, dcn_data=dcn_data, rules="fsdp"),
                                     key=lambda d: d.id // 4)
  assert meshes.host_local_layout(layout) is layout  # One process: unchanged.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_devices", lambda: jax.devices()[4:])
  got = meshes.host_local_layout(layout)
  assert tuple(got.mesh.shape.values()) == local
  assert set(got.mesh.devices.flat) == set(jax.devices()[4:])
  assert got.rules == layout.rules and got.sampling_rules == layout.sampling_rules

def test_mesh_config_defaults_and_old_gin_files_still_work():
  layout = meshes.layout_from_config(C.MeshConfig(data=-1, fsdp=1, tensor=1))
  assert dict(layout.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert layout.num_batch_shards == 8
  layout = meshes.layout_from_config(C.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert dict(layout.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert [d.id for d in layout.mesh.devices.flat] == [d.id for d in jax.devices()]
  with pytest.raises(RestJaxError, match="MeshConfig.rules 'zero3' is unknown; use one of"):
    C.MeshConfig(rules="zero3")
  with pytest.raises(RestJaxError, match="dcn_sizes"):
    C.MeshConfig(dcn_data=-1, dcn_fsdp=-1)
  # One process is one granule: a DCN split of 2 cannot be formed.
  with pytest.raises(RestJaxError, match="do not divide the 1 granules"):
    meshes.layout_from_config(C.MeshConfig(data=-1, dcn_data=2))


def test_rule_sets_are_selectable_in_gin(tmp_path):
  path = tmp_path / "mesh.gin"
  path.write_text("from __gin__ import dynamic_registration\nfrom rest_jax import config\n"
                  "include 'runs/base.gin'\n"
                  "config.MeshConfig:\n  data = 2\n  fsdp = 4\n  rules = 'fsdp'\n")
  cfg, _ = main.parse_run_config([str(path)], ["config.MeshConfig.dcn_tensor = 1"])
  assert cfg.mesh == C.MeshConfig(data=2, fsdp=4, tensor=1, rules="fsdp")


@pytest.mark.parametrize("rules, train, sampling, batch, shards", [
    ("2d", P("fsdp", "tensor"), P(None, "tensor"), P(("data", "fsdp")), 4),
    ("fsdp", P("fsdp", None), P(None, None), P(("data", "fsdp")), 4),
    ("tensor", P(None, "tensor"), P(None, "tensor"), P(("data", "fsdp")), 4),
    ("data", P(None, None), P(None, None), P(("data", "fsdp", "tensor")), 8),
])
def test_named_rule_sets_give_their_partition_specs(rules, train, sampling, batch, shards):
  layout = meshes.layout_from_config(C.MeshConfig(data=2, fsdp=2, tensor=2, rules=rules))
  assert layout.spec(("embed", "mlp"), (16, 32)) == train
  assert layout.spec(("embed", "mlp"), (16, 32), sampling=True) == sampling
  assert layout.spec(("batch",), (16,)) == batch
  assert layout.num_batch_shards == shards
  heads = layout.spec(("embed", "heads", "kv"), (16, 4, 8))
  assert heads == P(train[0], train[1], None)


def test_batch_sizes_that_do_not_split_fail_at_start_up(tmp_path):
  with pytest.raises(RestJaxError, match=r"= 12 is not divisible by .* 8; choose a multiple of 8"):
    distributed.check_batch_sizes({"bc TrainConfig.batch_size": 12}, num_batch_shards=8)
  distributed.check_batch_sizes({"x": 16}, num_batch_shards=8)  # Fine.
  cfg = C.RunConfig(
      task="numbers_de_en_small", model=get_preset("tiny", num_encoder_layers=1,
                                                  num_decoder_layers=1),
      input_len=40, target_len=40, bc=C.TrainConfig(batch_size=12, num_steps=2),
      grow=C.GrowConfig(sampling=C.SamplingConfig(max_decode_len=40)))
  with pytest.raises(RestJaxError, match="bc TrainConfig.batch_size = 12"):
    pipeline.run(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w" / "checkpoints").exists()  # Before BC ran.
  sampling = C.SamplingConfig(num_samples=3, batch_size=4, max_decode_len=40)
  with pytest.raises(RestJaxError, match="batch_size x num_samples = 12"):
    pipeline.run(dataclasses_replace(cfg, bc=C.TrainConfig(batch_size=16, num_steps=2),
                                 grow=C.GrowConfig(sampling=sampling)),
             str(tmp_path / "w2"), progress=False)


def dataclasses_replace(cfg, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(cfg, **kw)


def test_distributed_settings_from_flags_and_environment():
  env = {"REST_JAX_COORDINATOR": "10.0.0.1:1234", "REST_JAX_NUM_PROCESSES": "4",
         "REST_JAX_PROCESS_ID": "3"}
  s = distributed.settings_from({}, env)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.explicit) == (
      "10.0.0.1:1234", 4, 3, True)
  s = distributed.settings_from({"process_id": 1, "heartbeat_timeout_s": 7}, env)
  assert (s.process_id, s.heartbeat_timeout_s) == (1, 7)  # Flags win over the environment.
  assert not distributed.settings_from({}, {}).explicit  # Nothing given: auto-detect.
  with pytest.raises(RestJaxError, match="no coordinator address, number of processes"):
    distributed.settings_from({"process_id": 0}, {})
  with pytest.raises(RestJaxError, match=r"process_id=4 must be in \[0, num_processes=4\)"):
    distributed.settings_from({"process_id": 4}, env)
  with pytest.raises(RestJaxError, match="REST_JAX_NUM_PROCESSES='two'"):
    distributed.settings_from({}, dict(env, REST_JAX_NUM_PROCESSES="two"))


def test_initialize_uses_flags_else_cluster_detection_else_one_process(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
  assert distributed.initialize(distributed.DistributedSettings()) == 1
  assert not calls  # Nothing given, no cluster: a single process, jax.distributed untouched.
  monkeypatch.setattr(distributed, "detected_cluster", lambda: "SlurmCluster")
  distributed.initialize(distributed.DistributedSettings(heartbeat_timeout_s=9))
  assert calls == [dict(heartbeat_timeout_seconds=9, initialization_timeout=300)]
  distributed.initialize(distributed.DistributedSettings("h0:1234", 2, 1))
  assert calls[1] == dict(coordinator_address="h0:1234", num_processes=2, process_id=1,
                          heartbeat_timeout_seconds=100, initialization_timeout=300)
  distributed.initialize(distributed.DistributedSettings())  # Restores the defaults.


def test_single_process_helpers_are_no_ops():
  assert distributed.is_host0()
  distributed.barrier("alone", timeout_s=0.001)
  np.testing.assert_array_equal(distributed.allgather(np.arange(3)), [[0, 1, 2]])
  layout = meshes.layout_from_config(C.MeshConfig())
  assert distributed.process_rows(layout.sharding(("batch",)), 16) == slice(0, 16)
