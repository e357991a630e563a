"""Stacks of identical layers, unrolled or scanned, with per-layer rematerialisation.

Unrolled (``ModelConfig.scan_layers=False``, the default): layer ``i`` is the attribute
``layers_{i}`` (params ``layers_{i}.attention.q_proj.kernel`` `[embed, heads, kv]`, ...).

Scanned (``scan_layers=True``): one module ``layers`` whose every parameter carries a leading
layer axis (``layers.attention.q_proj.kernel`` `[layers, embed, heads, kv]`, logical name
``"layers"``, never sharded). Training forwards and prefills run ``jax.lax.scan`` over it, so
XLA compiles one layer instead of ``num_layers``; decode steps index it layer by layer, so each
layer's KV cache keeps being updated in place. A scanned stack is built from the same unrolled
layers (same random numbers), so a scanned model equals the unscanned one of the same seed.

Remat (``ModelConfig.remat_policy``) wraps each layer in ``jax.checkpoint`` while training:
"none" keeps every activation, "full" recomputes the layer in the backward pass, "dots" saves
the matmul outputs (``checkpoint_dots``), "dots_no_batch" only those without batch dimensions
(weights-like products; ``dots_with_no_batch_dims_saveable``), and "offload_dots" moves those to
pinned host memory instead of recomputing them (``offload_dot_with_no_batch_dims``; TPU/GPU).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.models.base import REMAT_POLICIES

LAYERS_AXIS = "layers"
__all__ = ["LAYERS_AXIS", "REMAT_POLICIES", "build_layers", "layer_at", "remat_policy",
           "run_layers", "stack_modules"]

Body = Callable[[nnx.Module, Any], tuple[Any, Any]]


def remat_policy(name: str) -> Callable | None:
  """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` name ("full": None saves nothing)."""
  policies = jax.checkpoint_policies
  return {"full": None, "dots": policies.checkpoint_dots,
          "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
          "offload_dots": policies.offload_dot_with_no_batch_dims("device", "pinned_host")}[name]


def _stack(variables: tuple[nnx.Variable, ...]) -> nnx.Variable:
  first = variables[0]
  names = first.get_metadata().get("out_sharding")
  value = jnp.stack([v.get_value() for v in variables])
  if names is None:
    return first.replace(value)
  return first.replace(value, out_sharding=(LAYERS_AXIS,) + tuple(names))


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module whose params are those of ``modules`` stacked on a new leading axis."""
  graphdef, first = nnx.split(modules[0])
  states = [first] + [nnx.split(m)[1] for m in modules[1:]]
  is_var = lambda x: isinstance(x, nnx.Variable)
  stacked = jax.tree.map(lambda *vs: _stack(vs), *states, is_leaf=is_var)
  return nnx.merge(graphdef, stacked)


def build_layers(parent: nnx.Module, make: Callable[[], nnx.Module], num: int, *,
                 scan: bool) -> None:
  """Adds ``num`` layers from ``make()`` to ``parent``: ``layers_{i}``, or stacked ``layers``."""
  layers = [make() for _ in range(num)]
  if scan:
    parent.layers = stack_modules(layers)
  else:
    for i, layer in enumerate(layers):
      setattr(parent, f"layers_{i}", layer)


def layer_at(parent: nnx.Module, i: int, *, scan: bool) -> nnx.Module:
  """Layer ``i`` of ``parent`` as a module (a slice of the stacked params when scanned)."""
  if not scan:
    return getattr(parent, f"layers_{i}")
  graphdef, state = nnx.split(parent.layers)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


def _checkpointed(body: Body, remat: str, *, prevent_cse: bool) -> Callable:
  """``(graphdef, state, carry) -> body(merge(graphdef, state), carry)``, maybe rematerialised."""

  def call(graphdef, state, carry):
    return body(nnx.merge(graphdef, state), carry)

  if remat == "none":
    return call
  return jax.checkpoint(call, policy=remat_policy(remat), prevent_cse=prevent_cse,
                        static_argnums=(0,))


def run_layers(parent: nnx.Module, body: Body, carry: Any, *, num: int, scan: bool,
               remat: str = "none") -> tuple[Any, list[Any]]:
  """Runs ``carry, y = body(layer, carry)`` through the ``num`` layers of ``parent`` in order.

  Args:
    parent: the module holding ``layers_{i}`` or the stacked ``layers``.
    body: one layer's step; ``y`` is a pytree of arrays (or None).
    carry: the activations (a pytree), e.g. `[batch, len, embed]`.
    num: the number of layers.
    scan: whether ``parent`` holds a stacked ``layers`` (``jax.lax.scan`` over it).
    remat: a ``REMAT_POLICIES`` name applied to every layer ("none": plain calls).
  Returns:
    the final carry and the ``num`` per-layer outputs ``y`` (a list; sliced from the scan's
    stacked outputs when scanned).
  """
  if not scan:
    ys = []
    for i in range(num):
      layer = getattr(parent, f"layers_{i}")
      if remat == "none":
        carry, y = body(layer, carry)
      else:
        graphdef, state = nnx.split(layer)
        carry, y = _checkpointed(body, remat, prevent_cse=True)(graphdef, state, carry)
      ys.append(y)
    return carry, ys
  graphdef, state = nnx.split(parent.layers)
  step = _checkpointed(body, remat, prevent_cse=False)
  carry, stacked = jax.lax.scan(lambda c, s: step(graphdef, s, c), carry, state)
  if stacked is None:
    return carry, [None] * num
  return carry, [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num)]
