"""Layout: logical names -> PartitionSpecs, mesh construction and its errors."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import mesh_layout
from rest_jax.errors import RestJaxError


def test_one_device_is_a_1x1x1_mesh():
  layout = mesh_layout(devices=jax.devices()[:1])
  assert dict(layout.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert layout.spec(("embed", "mlp")) == P(None, None)


def test_rules_map_logical_names_and_sampling_variant_unsplits_fsdp():
  layout = mesh_layout(2, 2, 2)
  assert layout.spec(("embed", "mlp"), (8, 8)) == P("fsdp", "tensor")
  assert layout.spec(("embed", "mlp"), (8, 8), sampling=True) == P(None, "tensor")
  assert layout.spec(("batch", "length"), (8, 4)) == P(("data", "fsdp"), None)
  assert layout.num_batch_shards == 4


def test_axis_that_does_not_divide_is_replicated():
  layout = mesh_layout(2, 1, 4)
  assert layout.spec(("embed", "kv_heads"), (8, 2)) == P(None, None)
  assert layout.spec(("embed", "kv_heads"), (8, 4)) == P(None, "tensor")
  # A mesh axis is used at most once per array.
  assert layout.spec(("heads", "mlp"), (4, 8)) == P("tensor", None)


def test_minus_one_fills_the_rest_and_bad_sizes_raise():
  assert dict(mesh_layout(-1, 2, 1).mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(RestJaxError, match="do not divide"):
    mesh_layout(3, 1, 1)
  with pytest.raises(RestJaxError, match="at most one"):
    mesh_layout(-1, -1, 1)
  with pytest.raises(RestJaxError, match="no rule"):
    mesh_layout(8, 1, 1).spec(("not_an_axis",))


def test_state_shardings_read_param_metadata():
  class M(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jax.numpy.zeros((8, 4)), out_sharding=("embed", "mlp"),
                         eager_sharding=False)
      self.count = nnx.Variable(jax.numpy.zeros(()))

  state = nnx.state(M())
  shardings = mesh_layout(2, 2, 2).state_shardings(state)
  assert shardings["w"].get_value().spec == P("fsdp", "tensor")
  assert shardings["count"].get_value().spec == P()
