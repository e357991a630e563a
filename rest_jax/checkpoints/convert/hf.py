"""Hugging Face checkpoints (``config.json`` + safetensors) in and out; no hub access.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Each host reads only the blocks of each tensor that its
devices hold under the Layout (``params.place_blocks``), with the ``safetensors`` slice API
(``safe_open(...).get_slice``: a block is read from the file's bytes, not the whole tensor),
as the T5X import does with TensorStore. See ``hf_config`` for the supported architectures and
the name mapping.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from rest_jax.checkpoints.convert import hf_config
from rest_jax.checkpoints.convert.params import check_names, place_blocks
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from rest_jax.parallel.layout import Layout

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safetensors():
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise RestJaxError("reading or writing Hugging Face checkpoints needs the `safetensors` "
                       "package; install it with `pip install -e \".[hf]\"` in the rest_jax "
                       "checkout (or `pip install safetensors`).") from e
  return safetensors


def read_hf_config(path: str) -> dict[str, Any]:
  """The ``config.json`` dict of an HF checkpoint directory."""
  config_path = storage.require_file(
      os.path.join(path, CONFIG_FILE), f"no {CONFIG_FILE} in {path}; pass a Hugging Face model "
      "directory (config.json + model.safetensors), e.g. one saved by save_pretrained.")
  return storage.read_json(config_path, keys=(), fix="restore it from the model's source.")


def _weight_files(path: str, *, shown: str) -> dict[str, str]:
  """Maps every tensor name to the safetensors file holding it (``shown``: the path errors
  name)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = storage.read_json(index, keys=("weight_map",),
                                   fix="restore it from the model's source.")["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(single):
    raise RestJaxError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {shown}; only safetensors weights "
                       "are read (convert pytorch_model.bin with `save_pretrained("
                       "safe_serialization=True)`).")
  safetensors = _safetensors()
  with safetensors.safe_open(single, framework="np") as f:
    return {name: single for name in f.keys()}


def read_slice(file: str, name: str, index: Sequence[slice]) -> np.ndarray:
  """The block ``tensor[index]`` of tensor ``name`` of ``file`` (one slice per axis), read with
  the safetensors slice API: only the block's bytes (bfloat16 through the flax API on the CPU
  backend, numpy having no bfloat16)."""
  safetensors = _safetensors()
  with safetensors.safe_open(file, framework="np") as f:
    try:
      return f.get_slice(name)[tuple(index)]
    except TypeError:  # numpy has no bfloat16: read it as a CPU jax array instead.
      pass
  with jax.default_device(jax.devices("cpu")[0]):
    with safetensors.safe_open(file, framework="flax") as f:
      return np.asarray(f.get_slice(name)[tuple(index)])


def _groups(name: str, source: Sequence[int], shape: Sequence[int]) -> list[tuple[int, ...]]:
  """Which of our axes (``shape``) each axis of the HF tensor (``source``, its shape as
  ``hf_config.to_ours`` transposes it) merges, in order: e.g. HF q_proj ``[heads * kv, embed]``
  transposed ``[embed, heads * kv]`` -> ``[(0,), (1, 2)]`` for ours ``[embed, heads, kv]``."""
  groups, axis = [], 0
  for size in source:
    group = [axis]
    while math.prod(shape[group[0]:group[-1] + 1]) < size:
      group.append(group[-1] + 1)
    if math.prod(shape[group[0]:group[-1] + 1]) != size:
      raise RestJaxError(f"{name}: the checkpoint's shape {tuple(source)} does not map onto "
                         f"{tuple(shape)}; the weights do not match config.json.")
    groups.append(tuple(group))
    axis = group[-1] + 1
  if groups and axis < len(shape):  # Trailing size-1 axes of ours join the last group.
    groups[-1] += tuple(range(axis, len(shape)))
  return groups


def _read_block(file: str, source: str, name: str, shape: tuple[int, ...],
                index: tuple[slice, ...], hf_shape: Sequence[int]) -> np.ndarray:
  """Block ``index`` of our parameter ``name`` (``shape``), read as a slice of HF tensor
  ``source`` (``hf_shape``). Each HF axis that merges several of ours is read over the rows of
  its outermost axis's slice (exact when only that axis is sharded, as the Layout's rules do),
  then cut to the block."""
  transposed = name.endswith(".kernel") or name.endswith("rel_embedding")
  source_shape = tuple(reversed(hf_shape)) if transposed else tuple(hf_shape)
  groups = _groups(name, source_shape, shape)
  ranges = []
  for group in groups:
    inner = math.prod(shape[a] for a in group[1:])
    ranges.append(slice(index[group[0]].start * inner, index[group[0]].stop * inner))
  block = read_slice(file, source, tuple(reversed(ranges)) if transposed else tuple(ranges))
  block = block.T if transposed else block
  covering = [index[a].stop - index[a].start if a == g[0] else shape[a]
              for g in groups for a in g]
  cut = tuple(slice(0, index[a].stop - index[a].start) if a == g[0] else index[a]
              for g in groups for a in g)
  return block.reshape(covering)[cut]


def load_hf(path: str, *, layout: Layout | None = None, dtype: str | None = None,
            scan_layers: bool = False) -> tuple[ModelConfig, nnx.State]:
  """Reads an HF checkpoint directory into our model.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    layout: the shardings to place the params on (default: ``layout_from_config(MeshConfig())``).
    dtype: sets ``dtype`` and ``param_dtype`` of the ModelConfig (e.g. "bfloat16"); None keeps
      the float32 defaults.
    scan_layers: build the stacked (scanned) layer layout (``ModelConfig.scan_layers``).
  Returns:
    the ModelConfig read from ``config.json`` and the params state of ``build_model(config)``.
  """
  cfg = read_hf_config(path)
  config = dataclasses.replace(hf_config.config_from_hf(cfg, dtype=dtype),
                               scan_layers=scan_layers)
  with storage.local_folder(path) as local:  # safetensors opens local files only.
    return config, _load_weights(local, path, cfg, config, layout)


def _load_weights(local: str, path: str, cfg: dict[str, Any], config: ModelConfig,
                  layout: Layout | None) -> nnx.State:
  """The params of ``load_hf`` from ``local`` (``path`` itself, or a local copy of it)."""
  files = _weight_files(local, shown=path)

  def read(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    source = hf_config.hf_name(config, name)
    scale = 1.0
    if name == "decoder.logits_dense.kernel":  # T5: a tied head reads `shared`, maybe scaled.
      scale = hf_config.t5_head_scale(cfg)
      if source not in files:
        source = "shared.weight"
    if source == "shared.weight" and source not in files:
      source = next((n for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
                     if n in files), source)
    if source not in files:
      raise RestJaxError(f"tensor {source} (for {name}) is missing from the checkpoint in {path}; "
                         "the weights do not match its config.json.")
    block = _read_block(files[source], source, name, shape, index, shapes[source])
    return block * np.asarray(scale, block.dtype) if scale != 1.0 else block

  safetensors = _safetensors()
  shapes = {}
  for file in sorted(set(files.values())):
    with safetensors.safe_open(file, framework="np") as f:
      shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
  return place_blocks(config, read, layout=layout)


def save_hf(path: str, config: ModelConfig, params: nnx.State) -> None:
  """Writes ``params`` as an HF checkpoint: ``config.json`` + ``model.safetensors``.

  ``transformers`` loads it with ``AutoModelForSeq2SeqLM`` (enc-dec, as T5) or
  ``AutoModelForCausalLM`` (decoder-only: Llama, or Qwen2 when ``attention_bias``). Tensors are
  gathered to the host one at a time; only process 0 writes. ``path`` must not exist yet.
  """
  safetensors = _safetensors()
  if storage.exists(path):
    raise RestJaxError(f"export path {path} already exists; choose a new path or delete it.")
  hf = hf_config.config_to_hf(config)
  tensors = {hf_config.hf_name(config, name): hf_config.to_hf(name, array)
             for name, array in check_names(config, params).items()}
  if jax.process_index() != 0:
    return
  with storage.atomic_dir(path, last=(CONFIG_FILE,)) as tmp:
    if any(t.dtype != np.float32 for t in tensors.values()):
      import safetensors.flax  # pylint: disable=g-import-not-at-top
      with jax.default_device(jax.devices("cpu")[0]):
        safetensors.flax.save_file({k: jax.numpy.asarray(v) for k, v in tensors.items()},
                                   os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    else:
      safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE),
                                  metadata={"format": "pt"})
    storage.write_json(storage.join(tmp, CONFIG_FILE), hf)
