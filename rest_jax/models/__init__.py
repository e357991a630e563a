"""Flax NNX sequence models: T5.1.1 encoder-decoder and Llama decoder-only, one interface."""

from __future__ import annotations

import math

import jax
from flax import nnx

from rest_jax.models.base import EOS_ID, PAD_ID, Cache, ModelConfig, SequenceModel
from rest_jax.models.llama import LlamaModel
from rest_jax.models.presets import PRESETS, get_preset
from rest_jax.models.t5 import T5Model

__all__ = [
    "EOS_ID", "PAD_ID", "PRESETS", "Cache", "LlamaModel", "ModelConfig", "SequenceModel",
    "T5Model", "abstract_model", "build_model", "count_params", "get_preset",
]


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> SequenceModel:
  """A randomly initialised model of ``config.kind`` ("encdec": T5Model, "decoder": LlamaModel)."""
  if config.kind == "encdec":
    return T5Model(config, rngs=rngs)
  return LlamaModel(config, rngs=rngs)


def abstract_model(config: ModelConfig) -> SequenceModel:
  """The model with jax.ShapeDtypeStruct parameters (no memory, no compute)."""
  return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's ``nnx.Param`` variables (works on abstract models)."""
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
