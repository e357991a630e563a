"""What every Improve-step loss shares: the batch contract, token log-probs and the ``Loss`` record.

Every loss sees the same batch (the Grow data after threshold filtering):

  * ``"inputs"``  int32 `[batch, input_len]`, right-padded prompts;
  * ``"targets"`` int32 `[batch, target_len]`, right-padded, ending with EOS (``PAD_ID`` = 0);
  * ``"reward"``  float32 `[batch]`, the sequence reward in [0, 1];
  * ``"behaviour_logprobs"`` float32 `[batch, target_len]`, recorded at Grow time;
  * ``"is_original"`` int32 `[batch]`, 1 for pairs of the original dataset D;
  * ``"step"`` int32 scalar: optimizer steps already taken in this phase (added by the Trainer).

A loss that needs more declares it in ``Loss.needs``; the Trainer's pre-pass
(``rest_jax.improve.extras``) then adds, per batch:

  * ``NEEDS_BC_LOGPROBS``: ``"bc_logprobs"`` float32 `[batch, target_len]`, log pi_BC(y_t | s_t)
    of the frozen BC policy;
  * ``NEEDS_START_LOGPROBS``: ``"start_logprobs"`` float32 `[batch, target_len, vocab]`, the full
    log-softmax of the policy this phase started from (frozen);
  * ``NEEDS_VALUES``: ``"values"`` float32 `[batch, target_len]`, V(s_t) of the behaviour value
    network, and ``"returns"`` float32 `[batch, target_len]`, the Monte-Carlo returns
    discount**(T - t) * R (0 on padding).

Token weights are ``targets != PAD_ID``. Losses are averaged over the target tokens of the whole
(global) batch, so a sharded batch gives the numbers of an unsharded one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from rest_jax.models.base import PAD_ID

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossParams = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]
ParamLossFn = Callable[[jax.Array, Batch, LossParams], tuple[jax.Array, Metrics]]

NEEDS_BC_LOGPROBS = "bc_logprobs"
NEEDS_START_LOGPROBS = "start_logprobs"
NEEDS_VALUES = "values"
KNOWN_NEEDS = frozenset({NEEDS_BC_LOGPROBS, NEEDS_START_LOGPROBS, NEEDS_VALUES})


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss as the Trainer runs it.

  ``fn(logits, batch, loss_params) -> (loss, metrics)``. ``needs`` names the extra batch entries
  it reads (see the module docstring). ``init_params`` (if set) returns the loss's own learnable
  scalars (e.g. Lagrange multipliers), trained by ``params_optimizer`` next to the model.
  """

  fn: ParamLossFn
  needs: frozenset[str] = frozenset()
  init_params: Callable[[], LossParams] | None = None
  params_optimizer: optax.GradientTransformation | None = None

  def __post_init__(self):
    unknown = set(self.needs) - KNOWN_NEEDS
    if unknown:
      raise ValueError(f"unknown loss needs {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}")
    if (self.init_params is None) != (self.params_optimizer is None):
      raise ValueError("a Loss with init_params needs a params_optimizer (and vice versa)")


def plain_loss(fn: LossFn) -> Loss:
  """A ``(logits, batch)`` loss as a ``Loss`` with no needs and no parameters."""
  return Loss(fn=lambda logits, batch, loss_params: fn(logits, batch))


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probabilities of the target tokens.

  Args:
    logits: `[batch, target_len, vocab]` (any float dtype; computed in float32).
    targets: int32 `[batch, target_len]`.
  Returns:
    float32 `[batch, target_len]`: ``log softmax(logits)[b, t, targets[b, t]]``.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def target_weights(targets: jax.Array) -> jax.Array:
  """float32 `[batch, target_len]`: 1 on target tokens, 0 on padding."""
  return (targets != PAD_ID).astype(jnp.float32)


def token_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(x * weights) / max(sum(weights), 1)`` over `[batch, target_len]`."""
  return (x * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def token_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  loss: jax.Array) -> Metrics:
  """{loss, token_accuracy, num_tokens} of a batch."""
  num_tokens = weights.sum()
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  return {
      "loss": loss,
      "token_accuracy": correct.sum() / jnp.maximum(num_tokens, 1.0),
      "num_tokens": num_tokens,
  }


def require(batch: Batch, *keys: str, loss: str) -> None:
  """Raises KeyError naming what a loss needs (a wiring bug: the pre-pass did not run)."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"loss {loss!r} needs batch entries {missing}; build the Trainer with the "
                   f"extras of rest_jax.improve.extras.build_extras for this loss's needs")


