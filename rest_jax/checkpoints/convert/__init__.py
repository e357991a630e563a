"""Checkpoint conversion: Hugging Face (safetensors), T5X (legacy msgpack + zarr) and our orbax.

``load_checkpoint`` reads any of them into ``(ModelConfig, params nnx.State)``; a checkpoint
*spec* string ``"hf:/path"``, ``"t5x:/path"`` or ``"orbax:/path"`` (or a bare path, whose
format is detected) names one, e.g. in ``RunConfig.init_checkpoint``. Our orbax format is a
directory with ``model_config.json`` (the ModelConfig fields) and ``params/`` (an orbax
``checkpoints.save_pytree`` of the params state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rest_jax.checkpoints import phases as checkpoints
from rest_jax.checkpoints.convert.hf import load_hf, save_hf
from rest_jax.checkpoints.convert.params import abstract_params, check_names, convert_layers
from rest_jax.checkpoints.convert.t5x import load_t5x, save_t5x
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import layout_from_config

__all__ = ["convert_layers", "detect_format", "load_checkpoint", "load_hf", "load_orbax", "load_t5x",
           "parse_spec", "read_model_config", "save_hf", "save_orbax", "save_t5x"]

Format = Literal["auto", "hf", "t5x", "orbax"]
FORMATS = ("hf", "t5x", "orbax")
MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def parse_spec(spec: str) -> tuple[str, str]:
  """``"hf:/p"`` -> ``("hf", "/p")``; a bare path -> ``("auto", path)``."""
  head, sep, tail = spec.partition(":")
  if sep and head in FORMATS:
    return head, tail
  return "auto", spec


def checkpoint_format(spec: str) -> str:
  """The format of a checkpoint spec: its prefix, else detected from the directory."""
  prefix, path = parse_spec(spec)
  return prefix if prefix != "auto" else detect_format(path)


def detect_format(path: str) -> str:
  """"hf" (config.json + safetensors), "t5x" (a ``checkpoint`` msgpack file) or "orbax"."""
  if storage.exists(storage.join(path, MODEL_CONFIG_FILE)):
    return "orbax"
  if storage.exists(storage.join(path, "checkpoint")):
    return "t5x"
  if storage.exists(storage.join(path, "config.json")):
    return "hf"
  raise RestJaxError(f"cannot tell the checkpoint format of {path!r}: it has no "
                     f"{MODEL_CONFIG_FILE} (orbax), `checkpoint` file (T5X) or config.json (HF); "
                     "check the path or prefix it with hf:, t5x: or orbax:.")


def model_config_from_dict(fields: dict) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise RestJaxError(f"model config has unknown fields {unknown}; it was written by a newer "
                       "rest_jax or edited by hand: remove them.")
  return ModelConfig(**fields)


def read_model_config(path: str) -> ModelConfig:
  """The ModelConfig stored in an orbax checkpoint directory (or a model_config.json file)."""
  file = storage.require_file(
      path if path.endswith(".json") else storage.join(path, MODEL_CONFIG_FILE),
      f"no {MODEL_CONFIG_FILE} at {path}; pass a directory written by `rest-jax import` / "
      "convert.save_orbax.")
  fields = storage.read_json(file, keys=(), fix="restore it, or import the checkpoint again "
                             "with `rest-jax import`.")
  try:
    return model_config_from_dict(fields)
  except RestJaxError as e:
    raise RestJaxError(f"{file}: {e}") from None
  except (TypeError, ValueError) as e:
    raise RestJaxError(f"{file} does not hold a valid model config ({e}); restore it, or import "
                       "the checkpoint again with `rest-jax import`.") from None


def save_orbax(path: str, config: ModelConfig, params: nnx.State) -> None:
  """Writes ``model_config.json`` and the orbax params under ``path`` (must not exist)."""
  if storage.exists(path):
    raise RestJaxError(f"output path {path} already exists; choose a new path or delete it.")
  check_names(config, params)
  storage.makedirs(path)
  checkpoints.save_pytree(storage.join(path, PARAMS_DIR), params)
  # Written last: read_model_config trusts a directory that has it.
  storage.write_json(storage.join(path, MODEL_CONFIG_FILE), dataclasses.asdict(config))


def load_orbax(path: str, *, config: ModelConfig | None = None,
               layout: Layout | None = None) -> tuple[ModelConfig, nnx.State]:
  """Reads a ``save_orbax`` directory; params land on the Layout's shardings.

  A checkpoint saved with the other layer layout (``scan_layers``) than ``config`` is restored
  as saved and converted (``convert_layers``)."""
  stored = read_model_config(path)
  config = config or stored
  layout = layout or layout_from_config(MeshConfig())
  as_saved = dataclasses.replace(config, scan_layers=stored.scan_layers)
  params = checkpoints.restore_params(storage.join(path, PARAMS_DIR),
                                      layout.abstract_state(abstract_params(as_saved)))
  return config, convert_layers(config, params, layout=layout)


def load_checkpoint(path: str, *, format: Format = "auto",  # pylint: disable=redefined-builtin
                    config: ModelConfig | None = None,
                    layout: Layout | None = None) -> tuple[ModelConfig, nnx.State]:
  """Reads an HF, T5X or orbax checkpoint into ``(ModelConfig, params state)``.

  Args:
    path: the checkpoint directory, or a spec ``"hf:/p"`` / ``"t5x:/p"`` / ``"orbax:/p"``.
    format: "auto" detects it (or takes the spec's prefix).
    config: required for T5X (its checkpoints carry no architecture); for HF it only sets the
      dtypes (the architecture comes from config.json and must match); for orbax it overrides
      model_config.json (e.g. other dtypes).
    layout: shardings for the params (default: ``layout_from_config(MeshConfig())``).
  """
  fmt = format if format != "auto" else checkpoint_format(path)
  path = parse_spec(path)[1]
  if fmt not in FORMATS:
    raise RestJaxError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS} or 'auto'.")
  if fmt == "hf":
    loaded, params = load_hf(path, layout=layout,
                             dtype=None if config is None else config.param_dtype,
                             scan_layers=config is not None and config.scan_layers)
    if config is not None:
      check_same_architecture(config, loaded, source=path)
      loaded = dataclasses.replace(loaded, dtype=config.dtype, remat_policy=config.remat_policy)
    return loaded, params
  if fmt == "t5x":
    if config is None:
      raise RestJaxError(f"a T5X checkpoint ({path}) does not record its architecture; pass "
                         "the model config (--preset / --config for the CLI, RunConfig.model "
                         "in gin).")
    return config, load_t5x(path, config=config, layout=layout)
  if config is not None:
    check_same_architecture(config, read_model_config(path), source=path)
  return load_orbax(path, config=config, layout=layout)


# The parameters with a vocabulary axis: (path, axis).
_VOCAB_PARAMS = {"decoder": ((("embed", "embedding"), 0), (("lm_head", "kernel"), 1)),
                 "encdec": ((("token_embedder", "embedding"), 0),
                            (("decoder", "logits_dense", "kernel"), 1))}


def reorder_vocab(config: ModelConfig, params: nnx.State, model_to_source: Any) -> nnx.State:
  """Reorders the token rows of imported params to a vocabulary's ids.

  A tokenizer wrapped with PAD 0 / EOS 1 (``vocabularies.HFTokenizerVocabulary``) swaps a few
  ids; the checkpoint's embedding and output layer are in the tokenizer's own order.

  Args:
    config: the model's config (its ``vocab_size`` may exceed the tokenizer's size).
    params: the imported params state.
    model_to_source: int `[tokenizer_size]`: model id -> checkpoint (tokenizer) id.
  Returns:
    params with embedding rows ``E[model_to_source]`` and output columns reordered alike.
  """
  perm = np.asarray(model_to_source, dtype=np.int64)
  if perm.size > config.vocab_size:
    raise RestJaxError(f"the tokenizer has {perm.size} tokens but the model only "
                       f"{config.vocab_size}; use a checkpoint whose vocabulary covers it.")
  if np.array_equal(perm, np.arange(perm.size)):
    return params
  perm = np.concatenate([perm, np.arange(perm.size, config.vocab_size)])
  for path, axis in _VOCAB_PARAMS[config.kind]:
    node = params
    for key in path:
      node = node[key]
    value = node[...]
    node[...] = jax.jit(lambda x, axis=axis: jnp.take(x, perm, axis=axis),
                        out_shardings=value.sharding)(value)
  return params


# Not the architecture: how the same weights are stored and run (checkpoints convert).
_DTYPE_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def check_same_architecture(expected: ModelConfig, actual: ModelConfig, *, source: str) -> None:
  """Raises unless the two configs agree on everything but the dtypes and the layer layout."""
  diffs = [f"{f.name}: {getattr(expected, f.name)!r} configured, {getattr(actual, f.name)!r} in "
           "the checkpoint" for f in dataclasses.fields(ModelConfig)
           if f.name not in _DTYPE_FIELDS and getattr(expected, f.name) != getattr(actual, f.name)]
  if diffs:
    raise RestJaxError(f"the checkpoint {source} does not match the configured model ("
                       f"{'; '.join(diffs[:6])}). Set the model config to the checkpoint's: "
                       "`rest-jax import` writes it as model.gin next to model_config.json.")
