"""The behaviour value network: a Transformer of the policy's family with a scalar head.

``ValueModel(config)`` builds the policy architecture of ``config`` (encoder-decoder or
decoder-only; untied output layer) and replaces its vocabulary projection by a ``[embed, 1]``
kernel plus a scalar bias, so the teacher-forced output at target position ``t`` is V(s_t),
a function of the inputs and ``targets[:, :t]`` only. Parameters keep the trunk's names under
``trunk.`` (``trunk.decoder.logits_dense.kernel`` / ``trunk.lm_head.kernel`` become the head) and
carry logical axis names like every model parameter, so the Layout shards them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.models.base import ModelConfig, Segments
from rest_jax.models.layers import Dense, make_param
from rest_jax.models.llama import LlamaModel
from rest_jax.models.t5 import T5Model


class ValueModel(nnx.Module):
  """V(s_t) for every target position: ``model(inputs, targets)`` -> float32 `[batch, target_len]`."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config = dataclasses.replace(config, tie_embeddings=False)
    self.config = config
    head = Dense((config.d_model,), (1,), ("embed", None), rngs=rngs, dtype=jnp.float32,
                 param_dtype=jnp.dtype(config.param_dtype), init_scale=0.01)
    if config.kind == "encdec":
      self.trunk = T5Model(config, rngs=rngs)
      self.trunk.decoder.logits_dense = head
    else:
      self.trunk = LlamaModel(config, rngs=rngs)
      self.trunk.lm_head = head
    self.bias = make_param(rngs, jax.nn.initializers.zeros, (), names=(), dtype=jnp.float32)

  def __call__(self, inputs: jax.Array, targets: jax.Array,
               segments: Segments | None = None) -> jax.Array:
    """Values `[batch, target_len]` of the states (inputs, targets[:, :t]).

    Args:
      inputs: int32 `[batch, input_len]`, right-padded prompts.
      targets: int32 `[batch, target_len]`, right-padded targets.
      segments: the segments of packed rows, or None (see ``SequenceModel``).
    """
    return self.trunk(inputs, targets, segments)[..., 0] + self.bias.get_value()
