"""Moving parameters between host arrays and a model's sharded ``nnx.State``, one tensor at a time.

Importers name every parameter by its dotted path in the model's state (e.g.
``decoder.layers_0.mlp.wi_0.kernel``) and give a function that reads that one tensor from the
source checkpoint as a host numpy array in our shape. ``place_params`` builds the state from
it: each tensor is placed straight onto its sharding from the Layout (every device receives
only its own shard), so no device ever holds a full copy of the whole model.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig, build_model
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import layout_from_config

Fetch = Callable[[str, tuple[int, ...]], np.ndarray]


def _flat(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
  return [(".".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def abstract_params(config: ModelConfig) -> nnx.State:
  """The state of ``build_model(config)`` with ``jax.ShapeDtypeStruct`` leaves (no memory)."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  return nnx.split(model)[1]


def param_names(config: ModelConfig) -> list[str]:
  """Dotted paths of every parameter of ``build_model(config)``, sorted."""
  return sorted(name for name, _ in _flat(abstract_params(config)))


def place_params(config: ModelConfig, fetch: Fetch, *, layout: Layout | None = None) -> nnx.State:
  """Builds the params state of ``build_model(config)`` from host tensors.

  Args:
    config: the architecture.
    fetch: ``(dotted_name, shape) -> np.ndarray`` of exactly ``shape`` (any float dtype; it is
      cast to ``config.param_dtype``).
    layout: shardings come from its training rules (default:
      ``layout_from_config(MeshConfig())``, over all devices).
  Returns:
    an ``nnx.State`` like ``nnx.split(build_model(config))[1]`` whose leaves are ``jax.Array``s
    placed on ``layout.sharding(logical names, shape)``.
  """
  layout = layout or layout_from_config(MeshConfig())
  state = abstract_params(config)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    name = ".".join(str(k) for k in path)
    leaf = var.get_value()
    shape = tuple(leaf.shape)
    host = np.asarray(fetch(name, shape))
    if tuple(host.shape) != shape:
      raise RestJaxError(f"checkpoint tensor for {name} has shape {tuple(host.shape)}, the model "
                         f"expects {shape}; the checkpoint does not match the model config.")
    host = host.astype(leaf.dtype)
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    sharding = layout.sharding(names, shape)
    var.set_value(jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx]))
  return nnx.from_flat_state(flat)


def host_arrays(params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(dotted_name, host numpy array)`` for every leaf, one tensor gathered at a time."""
  for name, var in _flat(params):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      value = multihost_utils.process_allgather(value, tiled=True)
    yield name, np.asarray(jax.device_get(value))


def check_names(config: ModelConfig, params: nnx.State) -> dict[str, np.ndarray]:
  """All host arrays of ``params``, after checking they are exactly the params of ``config``."""
  arrays = dict(host_arrays(params))
  expected = set(param_names(config))
  if set(arrays) != expected:
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    raise RestJaxError(f"params do not match the model config (missing {missing[:5]}, extra "
                       f"{extra[:5]}); pass the ModelConfig the params were built with.")
  return arrays


ReadBlock = Callable[[str, tuple[int, ...], tuple[slice, ...]], np.ndarray]


def _block_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A device's index (slices, ``slice(None)`` for a whole axis) as ``((start, stop), ...)``."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def place_blocks(config: ModelConfig, read: ReadBlock, *, layout: Layout | None = None
                 ) -> nnx.State:
  """Builds the params state of ``build_model(config)`` reading only this host's blocks.

  Like ``place_params``, but for sources that can read part of a tensor (TensorStore): for
  each tensor, each distinct block that this process's devices hold under the Layout's
  sharding is read once and put on those devices; replicated tensors are read whole. A host
  of a multi-host mesh never reads the blocks only other hosts hold.

  Args:
    config: the architecture.
    read: ``(dotted_name, shape, index) -> np.ndarray``: the block ``tensor[index]`` of the
      tensor ``dotted_name`` of our ``shape``; ``index`` is one ``slice(start, stop)`` per axis.
      Any float dtype (cast to ``config.param_dtype``).
    layout: shardings from its training rules (default: ``layout_from_config(MeshConfig())``).
  Returns:
    an ``nnx.State`` like ``nnx.split(build_model(config))[1]`` of ``jax.Array``s.
  """
  layout = layout or layout_from_config(MeshConfig())
  flat = nnx.to_flat_state(abstract_params(config))
  for path, var in flat:
    name = ".".join(str(k) for k in path)
    leaf = var.get_value()
    shape = tuple(leaf.shape)
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    sharding = layout.sharding(names, shape)
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      key = _block_key(index, shape)
      if key not in blocks:
        block = np.asarray(read(name, shape, tuple(slice(a, b) for a, b in key)))
        if block.shape != tuple(b - a for a, b in key):
          raise RestJaxError(f"checkpoint block {key} of {name} has shape {block.shape}; the "
                             "checkpoint does not match the model config.")
        blocks[key] = block.astype(leaf.dtype)
      shards.append(jax.device_put(blocks[key], device))
    var.set_value(jax.make_array_from_single_device_arrays(shape, sharding, shards))
  return nnx.from_flat_state(flat)
