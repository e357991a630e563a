"""The Trainer's pre-pass: per-batch inputs a loss declares in ``Loss.needs``.

``build_extras`` returns a function ``device batch -> {name: array}`` that runs frozen networks
(the BC policy, the phase's starting policy, the value network) on the batch in one jitted call,
sharded over the batch like the batch itself (on the packed rows of a packed batch, gathered
back per example: ``rest_jax.improve.packing``). The train step then reads them like any batch
entry, so it stays the same for every loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.improve.losses import (NEEDS_BC_LOGPROBS, NEEDS_START_LOGPROBS, NEEDS_VALUES,
                             token_logprobs)
from rest_jax.improve.packing import teacher_forced
from rest_jax.improve.value import ValueNet, mc_returns
from rest_jax.parallel.layout import Layout



@dataclasses.dataclass(frozen=True)
class Extras:
  """The pre-pass of one loss: ``extras(device batch) -> {name: array}``.

  ``frozen`` holds the frozen networks' params (concrete, or ``ShapeDtypeStruct``s for an
  ahead-of-time compile); ``jitted(frozen, batch)`` is the one jitted computation.
  """

  jitted: Any
  frozen: dict[str, Any]

  def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return self.jitted(self.frozen, batch)

  def lower(self, batch: dict[str, Any]) -> Any:
    """The pre-pass lowered for a (possibly abstract) batch: ``.compile()`` it."""
    return self.jitted.lower(self.frozen, batch)

  def output_shapes(self, batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of what the pre-pass adds to ``batch`` (nothing is computed)."""
    return jax.eval_shape(self.jitted, self.frozen, batch)


def build_extras(needs: frozenset[str], *, layout: Layout, policy_graphdef: nnx.GraphDef,
                 bc_params: nnx.State | None = None, start_params: nnx.State | None = None,
                 value_net: ValueNet | None = None, value_params: nnx.State | None = None,
                 discount: float = 1.0) -> Extras | None:
  """The pre-pass for ``needs`` (None when nothing is needed).

  Adds "bc_logprobs" `[batch, target_len]` (``bc_params``), "start_logprobs"
  `[batch, target_len, vocab]` (``start_params``), "values" and "returns" `[batch, target_len]`
  (``value_net`` / ``value_params``, returns with ``discount``). The params may be abstract
  (``ShapeDtypeStruct``s with shardings): then only ``Extras.lower`` / ``output_shapes`` apply.
  """
  if not needs:
    return None
  frozen = {}
  for need, key, value in ((NEEDS_BC_LOGPROBS, "bc", bc_params),
                           (NEEDS_START_LOGPROBS, "start", start_params),
                           (NEEDS_VALUES, "value", value_params)):
    if need in needs:
      if value is None or (need == NEEDS_VALUES and value_net is None):
        raise RestJaxError(f"the loss needs {need!r} but no {key} network was given; this is a "
                           "wiring bug in the caller of rest_jax.improve.extras.build_extras.")
      frozen[key] = value

  groups = layout.num_batch_shards  # Packed batches: rest_jax.improve.packing's groups.

  def compute(frozen, batch):
    targets = batch["targets"]
    run = lambda graphdef, params: teacher_forced(nnx.merge(graphdef, params), batch,
                                                  groups=groups)
    out = {}
    if "bc" in frozen:
      out["bc_logprobs"] = token_logprobs(run(policy_graphdef, frozen["bc"]), targets)
    if "start" in frozen:
      logits = run(policy_graphdef, frozen["start"])
      out["start_logprobs"] = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
    if "value" in frozen:
      out["values"] = run(value_net.graphdef, frozen["value"])
      out["returns"] = mc_returns(batch["reward"], targets, discount)
    return out

  jitted = jax.jit(compute, out_shardings=layout.sharding(("batch",)))
  return Extras(jitted, frozen)
