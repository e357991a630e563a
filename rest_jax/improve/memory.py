"""The training memory floor: what an Improve (or BC) step needs per device at the very least.

A lower bound, so that a run refuses at start-up only a step that cannot fit, whatever XLA does:
the TrainState shards (params, which are the master weights, and the two Adam moments, exact
from the Layout's shardings), one gradient per param shard, one float32 copy of the logits of
this device's rows, and every layer's input activations (kept by any remat policy, "full"
included). ``rest-jax compile-check`` measures the real step; this needs no compile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.topology import GIB


@dataclasses.dataclass(frozen=True)
class TrainFloor:
  """Per-device bytes: state (params + moments), gradients, logits and layer inputs."""

  state: int
  grads: int
  logits: int
  layer_inputs: int

  @property
  def total(self) -> int:
    return self.state + self.grads + self.logits + self.layer_inputs


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ``jax.ShapeDtypeStruct`` / arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def train_floor(model: ModelConfig, layout: Layout, abstract_params: Any, *, moment_dtype: str,
                batch_size: int, input_len: int, target_len: int) -> TrainFloor:
  """The per-device floor of one train step.

  Args:
    model: the model config (sizes, activation dtype).
    layout: the run's Layout (batch shards; the vocabulary split over ``tensor``).
    abstract_params: the params as ``jax.ShapeDtypeStruct``s on their training shardings
      (``layout.abstract_state(params)``).
    moment_dtype: ``TrainConfig.moment_dtype`` ("" = the params' dtype).
    batch_size: global sequences per step; ``input_len``, ``target_len``: their lengths.
  """
  params = shard_bytes(abstract_params)
  if moment_dtype:
    params_dtype = jnp.dtype(model.param_dtype)
    moments = 2 * params * jnp.dtype(moment_dtype).itemsize // params_dtype.itemsize
  else:
    moments = 2 * params
  rows = -(-batch_size // layout.num_batch_shards)
  vocab_shards = layout.mesh.shape["tensor"] if model.vocab_size % layout.mesh.shape[
      "tensor"] == 0 else 1
  itemsize = jnp.dtype(model.dtype).itemsize
  if model.kind == "decoder":
    tokens = input_len + target_len - 1
    layers = model.num_decoder_layers * tokens
  else:
    layers = model.num_encoder_layers * input_len + model.num_decoder_layers * target_len
  return TrainFloor(
      state=params + moments, grads=params,
      logits=rows * target_len * (model.vocab_size // vocab_shards) * 4,
      layer_inputs=rows * layers * model.d_model * itemsize)


def check_train_fits(floor: TrainFloor, available: int | None, *, step: str,
                     model: ModelConfig, layout: Layout, batch_size: int) -> None:
  """Raises when ``floor`` exceeds ``available`` bytes per device (None: unknown, no check)."""
  if available is None or floor.total <= available:
    return
  mesh = dict(layout.mesh.shape)
  raise RestJaxError(
      f"the {step} train step cannot fit: it needs at least {floor.total / GIB:.2f} GiB per "
      f"device ({floor.state / GIB:.2f} params + Adam moments, {floor.grads / GIB:.2f} "
      f"gradients, {floor.logits / GIB:.2f} logits, {floor.layer_inputs / GIB:.2f} layer "
      f"inputs), {(floor.total - available) / GIB:.2f} GiB over the {available / GIB:.2f} GiB "
      f"of each device. Raise MeshConfig.fsdp (now {mesh['fsdp']}) to split the weights and "
      f"moments further, lower the {step} TrainConfig.batch_size (now {batch_size}), or use "
      f"bfloat16 params (ModelConfig.param_dtype, now {model.param_dtype!r}); "
      "`rest-jax compile-check` measures the whole step.")
