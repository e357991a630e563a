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


def pytest_addoption(parser):
  parser.addoption("--run_slow", action="store_true", default=False,
                   help="also run tests marked slow (e.g. the README's full smoke run)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end test; runs only with --run_slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run_slow") or os.environ.get("REST_JAX_RUN_SLOW") == "1":
    return
  import pytest  # pylint: disable=g-import-not-at-top
  skip = pytest.mark.skip(reason="slow: run with --run_slow (or REST_JAX_RUN_SLOW=1)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
