"""Moving parameters between host arrays and a model's sharded ``nnx.State``, one tensor at a time.

Importers name every parameter by its dotted path in the model's state (e.g.
``decoder.layers_0.mlp.wi_0.kernel``) and give a function that reads that one tensor from the
source checkpoint as a host numpy array in our shape. ``place_params`` builds the state from
it: each tensor is placed straight onto its sharding from the Layout (every device receives
only its own shard), so no device ever holds a full copy of the whole model.

Names are always the unscanned ones (``layers_{i}``): for a model with ``scan_layers`` the
stacked ``layers.X`` `[layers, ...]` is read as ``layers_0.X``, ``layers_1.X``, ... and written
back the same way, so every importer and exporter serves both layouts. ``convert_layers``
turns a params state of one layout into the other (restoring a checkpoint of the other layout).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.parallel.distributed import global_array, host_array
from rest_jax.models import ModelConfig, build_model
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import layout_from_config
from rest_jax.models.stack import LAYERS_AXIS

Fetch = Callable[[str, tuple[int, ...]], np.ndarray]


def _flat(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
  return [(".".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def _layer_name(path: tuple, i: int) -> str:
  """The unscanned dotted name of layer ``i`` of a stacked path (``layers`` -> ``layers_{i}``)."""
  return ".".join(f"{LAYERS_AXIS}_{i}" if k == LAYERS_AXIS else str(k) for k in path)


def _is_stacked(path: tuple) -> bool:
  return LAYERS_AXIS in (str(k) for k in path)


def _stack(arrays: list[jax.Array], sharding: jax.sharding.Sharding) -> jax.Array:
  """Per-layer arrays -> one `[layers, ...]` array on ``sharding`` (device to device)."""
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)


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
    leaf = var.get_value()
    shape = tuple(leaf.shape)
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    if _is_stacked(path):  # Scanned: read every layer's tensor, stack them on the devices.
      per_layer = layout.sharding(names[1:], shape[1:])
      layers = [global_array(_fetch(fetch, _layer_name(path, i), shape[1:], leaf.dtype), per_layer)
                for i in range(shape[0])]
      var.set_value(_stack(layers, layout.sharding(names, shape)))
    else:
      name = ".".join(str(k) for k in path)
      var.set_value(global_array(_fetch(fetch, name, shape, leaf.dtype), layout.sharding(names, shape)))
  return nnx.from_flat_state(flat)


def _fetch(fetch: Fetch, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
  host = np.asarray(fetch(name, shape))
  if tuple(host.shape) != shape:
    raise RestJaxError(f"checkpoint tensor for {name} has shape {tuple(host.shape)}, the model "
                       f"expects {shape}; the checkpoint does not match the model config.")
  return host.astype(dtype)


def host_arrays(params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(dotted_name, host numpy array)`` for every leaf, one tensor gathered at a time.

  Stacked (scanned) params yield one unscanned name per layer, ``layers_{i}.X``."""
  for path, var in nnx.to_flat_state(params):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if not _is_stacked(path):
      yield ".".join(str(k) for k in path), host_array(value)
      continue
    for i in range(value.shape[0]):
      sliced = jax.jit(lambda x, i=i: x[i])(value) if isinstance(value, jax.Array) else value[i]
      yield _layer_name(path, i), host_array(sliced)


def check_names(config: ModelConfig, params: nnx.State) -> dict[str, np.ndarray]:
  """All host arrays of ``params`` by unscanned name, after checking they are exactly the params
  of ``config``."""
  arrays = dict(host_arrays(params))
  expected = set(param_names(dataclasses.replace(config, scan_layers=False)))
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
    leaf = var.get_value()
    shape = tuple(leaf.shape)
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    if _is_stacked(path):  # Scanned: this host's blocks of every layer, stacked on the devices.
      per_layer = layout.sharding(names[1:], shape[1:])
      layers = [_read_blocks(read, _layer_name(path, i), shape[1:], leaf.dtype, per_layer)
                for i in range(shape[0])]
      var.set_value(_stack(layers, layout.sharding(names, shape)))
    else:
      name = ".".join(str(k) for k in path)
      var.set_value(_read_blocks(read, name, shape, leaf.dtype, layout.sharding(names, shape)))
  return nnx.from_flat_state(flat)


def _read_blocks(read: ReadBlock, name: str, shape: tuple[int, ...], dtype: Any,
                 sharding: jax.sharding.Sharding) -> jax.Array:
  """The tensor ``name`` on ``sharding``, reading each distinct block this host holds once."""
  blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
  shards = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = _block_key(index, shape)
    if key not in blocks:
      block = np.asarray(read(name, shape, tuple(slice(a, b) for a, b in key)))
      if block.shape != tuple(b - a for a, b in key):
        raise RestJaxError(f"checkpoint block {key} of {name} has shape {block.shape}; the "
                           "checkpoint does not match the model config.")
      blocks[key] = block.astype(dtype)
    shards.append(jax.device_put(blocks[key], device))
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def convert_layers(config: ModelConfig, params: nnx.State, *,
                   layout: Layout | None = None) -> nnx.State:
  """``params`` of either layer layout as the params of ``config`` (scanned or unscanned).

  Stacks ``layers_{i}.X`` into ``layers.X`` `[layers, ...]` (or splits it), device to device,
  onto ``layout``'s shardings; params already in ``config``'s layout come back unchanged.
  """
  state = abstract_params(config)
  have = {".".join(str(k) for k in p): v for p, v in nnx.to_flat_state(params)}
  wanted = [".".join(str(k) for k in p) for p, _ in nnx.to_flat_state(state)]
  if set(have) == set(wanted):
    return params
  layout = layout or layout_from_config(MeshConfig())
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape = tuple(var.get_value().shape)
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    sharding = layout.sharding(names, shape)
    name = ".".join(str(k) for k in path)
    if _is_stacked(path):
      layers = [have[_layer_name(path, i)].get_value() for i in range(shape[0])]
      var.set_value(_stack(layers, sharding))
      continue
    source, i = _stacked_source(path)
    value = have[name].get_value() if source is None else have[source].get_value()
    if source is not None:
      value = jax.jit(lambda x, i=i: x[i], out_shardings=sharding)(value)
    var.set_value(jax.device_put(value, sharding))
  return nnx.from_flat_state(flat)


def _stacked_source(path: tuple) -> tuple[str | None, int]:
  """(the stacked name holding this unscanned ``layers_{i}`` path, i), or (None, -1)."""
  keys = [str(k) for k in path]
  for j, key in enumerate(keys):
    head, _, index = key.rpartition("_")
    if head == LAYERS_AXIS and index.isdigit():
      return ".".join(keys[:j] + [LAYERS_AXIS] + keys[j + 1:]), int(index)
  return None, -1
