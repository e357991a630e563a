"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def mesh_layout(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None,
                rules: str = "2d"):
  """``meshes.layout_from_config(MeshConfig(data, fsdp, tensor, rules=rules), devices)``: the
  library's one way from mesh sizes to a Layout, spelled short for tests."""
  from rest_jax.config import MeshConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel.meshes import layout_from_config  # pylint: disable=g-import-not-at-top
  return layout_from_config(MeshConfig(data, fsdp, tensor, rules=rules), devices=devices)
