"""T5X checkpoints (the legacy t5x ``Checkpointer`` format) in and out of our encoder-decoder.

A T5X checkpoint directory (``checkpoint_<step>/``) holds a flax-msgpack file ``checkpoint``:
``{version: 3, optimizer: {target: <params>, state: {step, param_states}}}``. Each array leaf
is either stored inline or replaced by a relative TensorStore spec of a zarr v2 array stored in
the same directory (tree path joined by ".", e.g. ``target.encoder.layers_0.mlp.wi_0.kernel``).
T5X parameter names are ours (``rest_jax.models.t5``); only the attention kernels differ in
shape: t5x stores ``[embed, heads * kv]`` / ``[heads * kv, embed]``, ours are unflattened.
Checkpoints in the newer orbax-based t5x format are not read here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx, serialization

from rest_jax.checkpoints.convert.params import check_names, place_params
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from rest_jax.parallel.layout import Layout

CHECKPOINT_FILE = "checkpoint"
VERSION = 3


def _tensorstore():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top  (an orbax dependency)
  return ts


def _read_msgpack(path: str) -> dict[str, Any]:
  file = storage.require_file(
      os.path.join(path, CHECKPOINT_FILE), f"no T5X `{CHECKPOINT_FILE}` file in {path}; pass a "
      "t5x checkpoint directory such as .../checkpoint_200.")
  tree = serialization.msgpack_restore(storage.read_bytes(file))
  if not isinstance(tree, Mapping) or "target" not in (tree.get("optimizer") or {}):
    raise RestJaxError(f"{file} is not a legacy T5X checkpoint (no optimizer/target); only the "
                       "t5x Checkpointer format (msgpack + zarr) is supported.")
  return tree


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, Mapping) and "driver" in leaf and "kvstore" in leaf


def _read_leaf(path: str, leaf: Any) -> np.ndarray:
  """An inline array, or the zarr array a relative TensorStore spec points at."""
  if not _is_spec(leaf):
    return np.asarray(leaf)
  ts = _tensorstore()
  spec = dict(leaf)
  kvstore = dict(spec["kvstore"])
  if kvstore.get("driver") == "file" and not os.path.isabs(kvstore["path"]):
    kvstore["path"] = os.path.join(path, kvstore["path"])
  spec["kvstore"] = kvstore
  spec.pop("metadata", None)  # Read what is on disk.
  return ts.open(spec, open=True).result().read().result()


def _t5x_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The 2-D t5x shape of our kernel (attention out kernels have input rank 2)."""
  if not name.endswith(".kernel") or len(shape) <= 2:
    return shape
  r = 2 if name.endswith(".out.kernel") else 1
  return (int(np.prod(shape[:r])), int(np.prod(shape[r:])))


def load_t5x(path: str, *, config: ModelConfig, layout: Layout | None = None) -> nnx.State:
  """Reads the params (``optimizer.target``) of a T5X checkpoint; the optimizer state is skipped.

  Args:
    path: the checkpoint directory (holding the ``checkpoint`` msgpack file).
    config: the encoder-decoder architecture (T5X checkpoints do not record it).
    layout: shardings for the params (default: ``layout_from_config(MeshConfig())``).
  Returns:
    the params state of ``build_model(config)``, each tensor on its sharding.
  """
  if config.kind != "encdec":
    raise RestJaxError("T5X checkpoints hold encoder-decoder models; set ModelConfig.kind="
                       "'encdec' (and the checkpoint's sizes).")
  target = _read_msgpack(path)["optimizer"]["target"]

  def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    node: Any = target
    for key in name.split("."):
      if not isinstance(node, Mapping) or key not in node:
        raise RestJaxError(f"parameter target.{name} is missing from the T5X checkpoint {path}; "
                           "the model config does not match it (check num layers, "
                           "logits_via_embedding=False).")
      node = node[key]
    array = _read_leaf(path, node)
    if tuple(array.shape) != _t5x_shape(name, shape):
      raise RestJaxError(f"T5X tensor target.{name} has shape {tuple(array.shape)}; the model "
                         f"config expects {_t5x_shape(name, shape)}. Fix the ModelConfig sizes.")
    return array.reshape(shape)

  return place_params(config, fetch, layout=layout)


def _write_zarr(path: str, rel: str, array: np.ndarray) -> dict[str, Any]:
  """Writes one gzip zarr v2 array (one chunk) and returns its relative spec for the msgpack."""
  ts = _tensorstore()
  metadata = {"shape": list(array.shape), "chunks": list(array.shape) or [1],
              "compressor": {"id": "gzip", "level": 1}}
  dtype = str(array.dtype)
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                 "path": os.path.join(path, rel)},
                   "metadata": {**metadata, "dtype": np.dtype(array.dtype).str
                                if dtype != "bfloat16" else "bfloat16"}},
                  create=True, open=False).result()
  store.write(array).result()
  return {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": rel + "/"},
          "metadata": metadata}


def save_t5x(path: str, config: ModelConfig, params: nnx.State, *, step: int = 0) -> None:
  """Writes ``params`` as a T5X checkpoint directory (``path`` must not exist).

  The msgpack holds ``optimizer.target`` (the params, flattened attention kernels, each a zarr
  array) and ``optimizer.state.step``; ``param_states`` is empty (no optimizer state), so t5x
  restores these params with a fresh optimizer state (e.g. as ``initial_checkpoint``).
  """
  if config.kind != "encdec":
    raise RestJaxError("only encoder-decoder models can be written as T5X checkpoints.")
  if os.path.exists(path):
    raise RestJaxError(f"export path {path} already exists; choose a new path or delete it.")
  arrays = check_names(config, params)
  if jax.process_index() != 0:
    return
  with storage.atomic_dir(path, last=(CHECKPOINT_FILE,)) as tmp:  # On GCS: uploaded last.
    target: dict[str, Any] = {}
    for name, array in sorted(arrays.items()):
      flat = array.reshape(_t5x_shape(name, array.shape))
      node = target
      keys = name.split(".")
      for key in keys[:-1]:
        node = node.setdefault(key, {})
      node[keys[-1]] = _write_zarr(tmp, "target." + name, flat)
    tree = {"version": VERSION, "optimizer": {
        "target": target, "state": {"step": np.asarray(step, np.int32), "param_states": {}}}}
    storage.write_bytes(storage.join(tmp, CHECKPOINT_FILE),
                        serialization.msgpack_serialize(tree))
