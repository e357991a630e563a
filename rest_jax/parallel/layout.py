"""Layout: one device mesh (data, fsdp, tensor) and one logical-axis rules table.

This is the only module that builds PartitionSpecs and NamedShardings. Parameters carry
t5x-style logical axis names (``out_sharding`` metadata on every ``nnx.Param``); caches and
batches name theirs explicitly. The sampling variant of the rules keeps weights unsplit over
``fsdp`` while decoding (weights are gathered once per Grow step instead of once per token).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rest_jax.errors import RestJaxError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Training rules: batch over (data, fsdp); weights split over fsdp on their embed axis (ZeRO-3
# style) and over tensor on heads / mlp / vocab (Megatron style).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),  # The stacked layer axis of scanned models: never split.
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)

# Sampling rules: identical, except weights are not split over fsdp.
SAMPLING_RULES: Rules = tuple(
    (name, None if name == "embed" else axes) for name, axes in TRAIN_RULES)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the logical-axis rules (training and sampling variants).

  Every sharding in the library comes from ``Layout.sharding`` / ``Layout.tree_shardings``.
  A mesh axis is dropped for an array dimension it does not divide (that dimension is then
  replicated), so tiny test models run on any mesh.
  """

  mesh: Mesh
  rules: Rules = TRAIN_RULES
  sampling_rules: Rules = SAMPLING_RULES

  @property
  def num_batch_shards(self) -> int:
    """How many ways the batch axis is split (data x fsdp under the default rules)."""
    axes = dict(self.rules)["batch"]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return math.prod(self.mesh.shape[a] for a in axes)

  def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None, *,
           sampling: bool = False) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec under the (sampling) rules."""
    table = dict(self.sampling_rules if sampling else self.rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(logical):
      if name is None:
        out.append(None)
        continue
      if name not in table:
        raise RestJaxError(f"logical axis {name!r} has no rule; known axes: {sorted(table)}. "
                           "Add it to the rules table in rest_jax/parallel/layout.py.")
      axes = table[name]
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
      if shape is not None and axes:
        size = math.prod(self.mesh.shape[a] for a in axes)
        if shape[dim] % size:
          axes = ()
      used.update(axes)
      out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)

  def sharding(self, logical: Sequence[str | None], shape: Sequence[int] | None = None, *,
               sampling: bool = False) -> NamedSharding:
    """A NamedSharding for one array with the given logical axes."""
    return NamedSharding(self.mesh, self.spec(logical, shape, sampling=sampling))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a host batch whose leading axis is the batch: `[batch, ...]`."""
    return self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)

  def state_shardings(self, state: Any, *, sampling: bool = False) -> Any:
    """Shardings for an ``nnx.State`` (or any tree of ``nnx.Variable``) from their metadata.

    Variables without ``out_sharding`` metadata (e.g. optimizer counters) are replicated.
    Returns a tree of the same structure whose Variables hold NamedShardings.
    """

    def one(x):
      if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding")
        shape = getattr(x.get_value(), "shape", ())
        if names is None:
          names = (None,) * len(shape)
        return x.replace(self.sharding(names, shape, sampling=sampling))
      shape = getattr(x, "shape", ())
      return self.sharding((None,) * len(shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def abstract_state(self, state: Any, *, sampling: bool = False) -> Any:
    """``state`` (arrays or ShapeDtypeStructs in Variables) as ShapeDtypeStructs placed on
    ``state_shardings(state)``: the target of an orbax restore or an AOT lowering."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        self.state_shardings(state, sampling=sampling))

  def tree_shardings(self, tree: Any, logical_tree: Any, *, sampling: bool = False) -> Any:
    """Shardings for a plain pytree of arrays given a matching tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: self.sharding(names, x.shape, sampling=sampling), logical_tree, tree,
        is_leaf=lambda n: isinstance(n, tuple))
