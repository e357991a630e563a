"""T5X checkpoints (the legacy t5x ``Checkpointer`` format) in and out of our encoder-decoder.

A T5X checkpoint directory (``checkpoint_<step>/``) holds a flax-msgpack file ``checkpoint``:
``{version: 3, optimizer: {target: <params>, state: {step, param_states}}}``. Each array leaf
is either stored inline or replaced by a relative TensorStore spec of a zarr v2 array stored in
the same directory (tree path joined by ".", e.g. ``target.encoder.layers_0.mlp.wi_0.kernel``).
T5X parameter names are ours (``rest_jax.models.t5``); only the attention kernels differ in
shape: t5x stores ``[embed, heads * kv]`` / ``[heads * kv, embed]``, ours are unflattened.
Checkpoints in the newer orbax-based t5x format are not read here.

Reading resolves each spec as t5x's own ``checkpoints.py`` does: the stored path is relative
to the checkpoint directory, and the stored kvstore driver (``file``, ``gfile``, or ``gcs``
with the placeholder bucket t5x writes on GCS) is replaced by where the checkpoint is now: the
``file`` driver for a local copy, ``gcs`` with the URL's bucket for ``gs://``. Each host reads
only the blocks of each tensor that its devices hold under the Layout (``place_blocks``).

Writing adds what t5x's restore needs besides the params: ``state.param_states`` holds fresh
(zero) states of t5x's default optimizer, ``t5x.adafactor.Adafactor`` (``factored=True``,
``min_dim_size_to_factor=128``, no momentum), so ``TrainStateInitializer.from_checkpoint``
restores it with the optimizer of t5x's gin configs.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx, serialization

from rest_jax.checkpoints.convert.params import check_names, place_blocks
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from rest_jax.parallel.layout import Layout

CHECKPOINT_FILE = "checkpoint"
VERSION = 3
_GCS_URL = re.compile(r"^gs://([^/]+)/*(.*)$", re.DOTALL)
_DRIVERS = ("file", "gfile", "gcs")
_CHUNK_BYTES = 64 * 2**20  # t5x's target zarr chunk size.
_CACHE_BYTES = 2**30
# t5x.adafactor.Adafactor defaults: factor the two largest axes when the smaller is >= 128.
MIN_DIM_SIZE_TO_FACTOR = 128


def _tensorstore():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top  (an orbax dependency)
  return ts


def checkpoint_dir(path: str) -> str:
  """The checkpoint directory as TensorStore takes it: local paths absolute and normalised
  (no ``..``), ``gs://`` URLs unchanged but for trailing slashes."""
  return storage.absolute(path)


def _kvstore(ckpt_dir: str, rel: str) -> dict[str, Any]:
  """The kvstore of ``rel`` (relative to ``ckpt_dir``): ``gcs`` for a gs:// URL, else ``file``."""
  url = _GCS_URL.match(ckpt_dir)
  if url:
    return {"driver": "gcs", "bucket": url.group(1), "path": posixpath.join(url.group(2), rel)}
  return {"driver": "file", "path": os.path.join(ckpt_dir, rel)}


def resolve_spec(ckpt_dir: str, spec: Mapping[str, Any]) -> dict[str, Any]:
  """A stored TensorStore spec pointed at the checkpoint's actual location (as t5x does).

  Args:
    ckpt_dir: ``checkpoint_dir(path)``: an absolute local path or ``gs://bucket/prefix``.
    spec: the spec from the msgpack, e.g. ``{"driver": "zarr", "kvstore": {"driver": "gcs",
      "bucket": "t5x-dummy-bucket", "path": "target.x.kernel/"}, "metadata": {...}}``; the path
      may also sit at the top level (tensorstore < 0.1.14 wrote it there).
  Returns:
    the spec to open, its stored ``metadata`` dropped (the array's own is read).
  """
  spec = dict(spec)
  kvstore = dict(spec.get("kvstore") or {})
  if "path" in spec:
    kvstore["path"] = posixpath.join(str(kvstore.get("path", "")), str(spec.pop("path")))
  if kvstore.get("driver") not in _DRIVERS or "path" not in kvstore:
    raise RestJaxError(f"unsupported TensorStore kvstore {kvstore} in the T5X checkpoint "
                       f"{ckpt_dir}; only t5x's {_DRIVERS} specs with a relative path are read.")
  spec["kvstore"] = _kvstore(ckpt_dir, kvstore["path"])
  spec.pop("metadata", None)
  return spec


def _read_msgpack(path: str) -> dict[str, Any]:
  file = storage.require_file(
      storage.join(path, CHECKPOINT_FILE), f"no T5X `{CHECKPOINT_FILE}` file in {path}; pass a "
      "t5x checkpoint directory such as .../checkpoint_200.")
  tree = serialization.msgpack_restore(storage.read_bytes(file))
  if not isinstance(tree, Mapping) or "target" not in (tree.get("optimizer") or {}):
    raise RestJaxError(f"{file} is not a legacy T5X checkpoint (no optimizer/target); only the "
                       "t5x Checkpointer format (msgpack + zarr) is supported.")
  return tree


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, Mapping) and "driver" in leaf and "kvstore" in leaf


def _open(ckpt_dir: str, leaf: Any, context: Any = None) -> Any:
  """An inline array as numpy, or the TensorStore its spec names (opened, nothing read)."""
  if not _is_spec(leaf):
    return np.asarray(leaf)
  spec = resolve_spec(ckpt_dir, leaf)
  try:
    return _tensorstore().open(spec, open=True, read=True, context=context).result()
  except ValueError as e:
    raise RestJaxError(f"cannot open T5X array {spec['kvstore']} ({e}); check that the "
                       "checkpoint directory is complete and readable.") from None


def read_domain(source: Any, index: tuple[slice, ...]) -> np.ndarray:
  """Reads ``source[index]`` (a TensorStore or an inline numpy array): the only T5X read."""
  if isinstance(source, np.ndarray):
    return source[index]
  return source[index].read().result()


def _t5x_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The 2-D t5x shape of our kernel (attention out kernels have input rank 2)."""
  if not name.endswith(".kernel") or len(shape) <= 2:
    return shape
  r = 2 if name.endswith(".out.kernel") else 1
  return (int(np.prod(shape[:r])), int(np.prod(shape[r:])))


def _t5x_groups(name: str, shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """Our axes ``[lo, hi)`` that make each t5x axis (merged row-major)."""
  if len(_t5x_shape(name, shape)) == len(shape):
    return [(i, i + 1) for i in range(len(shape))]
  r = 2 if name.endswith(".out.kernel") else 1
  return [(0, r), (r, len(shape))]


def _read_block(source: Any, name: str, shape: tuple[int, ...],
                index: tuple[slice, ...]) -> np.ndarray:
  """The block ``ours[index]`` of a tensor stored in t5x's shape: one read of the smallest t5x
  domain that covers it (a merged axis reads the range of its row-major flat indices)."""
  t5x_index, takes = [], []
  for lo, hi in _t5x_groups(name, shape):
    if hi - lo == 1:
      t5x_index.append(index[lo])
      takes.append(None)
      continue
    grid = np.meshgrid(*[np.arange(s.start, s.stop) for s in index[lo:hi]], indexing="ij")
    flat = np.ravel_multi_index(grid, shape[lo:hi]).ravel()
    first = int(flat.min()) if flat.size else 0
    t5x_index.append(slice(first, int(flat.max()) + 1 if flat.size else 0))
    contiguous = np.array_equal(flat, np.arange(first, first + flat.size))
    takes.append(None if contiguous else flat - first)
  block = np.asarray(read_domain(source, tuple(t5x_index)))
  for axis, take in enumerate(takes):
    if take is not None:
      block = np.take(block, take, axis=axis)
  return block.reshape(tuple(s.stop - s.start for s in index))


def load_t5x(path: str, *, config: ModelConfig, layout: Layout | None = None) -> nnx.State:
  """Reads the params (``optimizer.target``) of a T5X checkpoint; the optimizer state is skipped.

  Args:
    path: the checkpoint directory (holding the ``checkpoint`` msgpack file): local (relative
      paths and ``..`` are fine) or ``gs://bucket/...``.
    config: the encoder-decoder architecture (T5X checkpoints do not record it).
    layout: shardings for the params (default: ``layout_from_config(MeshConfig())``); each
      host reads only the blocks its devices hold.
  Returns:
    the params state of ``build_model(config)``, each tensor on its sharding.
  """
  if config.kind != "encdec":
    raise RestJaxError("T5X checkpoints hold encoder-decoder models; set ModelConfig.kind="
                       "'encdec' (and the checkpoint's sizes).")
  ckpt_dir = checkpoint_dir(path)
  target = _read_msgpack(ckpt_dir)["optimizer"]["target"]
  opened: dict[str, Any] = {}
  # Decoded chunks, shared by this host's blocks of a tensor: a chunk is decoded once, not once
  # per block (4x faster for 4 blocks of one-chunk tensors), at most _CACHE_BYTES of memory.
  context = _tensorstore().Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})

  def source(name: str, shape: tuple[int, ...]) -> Any:
    if name in opened:
      return opened[name]
    opened.clear()  # place_blocks reads one tensor after another.
    node: Any = target
    for key in name.split("."):
      if not isinstance(node, Mapping) or key not in node:
        raise RestJaxError(f"parameter target.{name} is missing from the T5X checkpoint {path}; "
                           "the model config does not match it (check num layers, "
                           "logits_via_embedding=False).")
      node = node[key]
    opened[name] = _open(ckpt_dir, node, context)
    stored = tuple(opened[name].shape)
    if stored != _t5x_shape(name, shape):
      raise RestJaxError(f"T5X tensor target.{name} has shape {stored}; the model config "
                         f"expects {_t5x_shape(name, shape)}. Fix the ModelConfig sizes.")
    return opened[name]

  def read(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    return _read_block(source(name, shape), name, shape, index)

  return place_blocks(config, read, layout=layout)


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
  """A zarr chunk of at most ~64 MiB that divides ``shape``: the largest axis is cut first
  (t5x's rule), so a host reading its block of a big tensor reads few other bytes."""
  chunk = list(shape) or [1]
  while int(np.prod(chunk)) * itemsize > _CHUNK_BYTES:
    axis = int(np.argmax(chunk))
    size = chunk[axis]
    chunk[axis] = max(d for d in range(1, size) if shape[axis] % d == 0 and d < size)
  return chunk


def _write_zarr(path: str, rel: str, array: np.ndarray) -> dict[str, Any]:
  """Writes one gzip zarr v2 array and returns its relative spec for the msgpack."""
  ts = _tensorstore()
  dtype = np.dtype(array.dtype)
  metadata = {"shape": list(array.shape), "chunks": chunk_shape(array.shape, dtype.itemsize),
              "compressor": {"id": "gzip", "level": 1}}
  store = ts.open({"driver": "zarr", "kvstore": _kvstore(path, rel),
                   "metadata": {**metadata, "dtype": "bfloat16" if dtype.name == "bfloat16"
                                else dtype.str}},
                  create=True, open=False).result()
  store.write(array).result()
  return {"driver": "zarr", "dtype": dtype.name, "kvstore": {"driver": "file", "path": rel + "/"},
          "metadata": metadata}


def adafactor_state(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """Shapes of a fresh ``t5x.adafactor.Adafactor`` state for a param of t5x ``shape``.

  As ``Adafactor.init_param_state`` with t5x's defaults (factored, ``min_dim_size_to_factor``
  128, ``beta1=None``; rank <= 2 params use its size heuristic even with
  ``logical_factor_rules``): a param whose two largest axes are >= 128 gets ``v_row`` (the
  largest axis removed) and ``v_col`` (the second largest removed) and ``v`` of shape [1];
  others get a full ``v``. ``m`` is always [1]. Every entry is zeros (float32).
  """
  state = {"m": (1,), "v": (1,), "v_col": (1,), "v_row": (1,)}
  order = np.argsort(shape) if len(shape) >= 2 else []
  if len(shape) >= 2 and shape[order[-2]] >= MIN_DIM_SIZE_TO_FACTOR:
    state["v_row"] = tuple(np.delete(shape, order[-1]).tolist())
    state["v_col"] = tuple(np.delete(shape, order[-2]).tolist())
  else:
    state["v"] = tuple(shape)
  return state


def _param_state(tmp: str, name: str, shape: tuple[int, ...]) -> dict[str, Any]:
  """The msgpack entry of one param's Adafactor state: full ``v`` as zarr (t5x shards it like
  the param), the small factors and placeholders inline, as t5x's Checkpointer writes them."""
  out: dict[str, Any] = {}
  for key, state_shape in adafactor_state(shape).items():
    zeros = np.zeros(state_shape, np.float32)
    full = key == "v" and state_shape == tuple(shape)
    out[key] = _write_zarr(tmp, f"state.param_states.{name}.v", zeros) if full else zeros
  return out


def _insert(tree: dict[str, Any], name: str, value: Any) -> None:
  keys = name.split(".")
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def save_t5x(path: str, config: ModelConfig, params: nnx.State, *, step: int = 0) -> None:
  """Writes ``params`` as a T5X checkpoint directory (``path`` must not exist; local or gs://).

  The msgpack holds ``optimizer.target`` (the params, flattened attention kernels, each a zarr
  array), ``optimizer.state.step`` and ``optimizer.state.param_states``: fresh Adafactor
  states (``adafactor_state``), so t5x restores the checkpoint with ``load_t5x_checkpoint`` and
  with ``TrainStateInitializer.from_checkpoint`` (``RestoreCheckpointConfig(mode='specific')``)
  under its default optimizer, and continues training from it.
  """
  if config.kind != "encdec":
    raise RestJaxError("only encoder-decoder models can be written as T5X checkpoints.")
  path = checkpoint_dir(path)
  if storage.exists(path):
    raise RestJaxError(f"export path {path} already exists; choose a new path or delete it.")
  arrays = check_names(config, params)
  if jax.process_index() != 0:
    return
  with storage.atomic_dir(path, last=(CHECKPOINT_FILE,)) as tmp:  # On GCS: uploaded last.
    target: dict[str, Any] = {}
    param_states: dict[str, Any] = {}
    for name, array in sorted(arrays.items()):
      flat = array.reshape(_t5x_shape(name, array.shape))
      _insert(target, name, _write_zarr(tmp, "target." + name, flat))
      _insert(param_states, name, _param_state(tmp, name, flat.shape))
    tree = {"version": VERSION, "optimizer": {"target": target, "state": {
        "step": np.asarray(step, np.int32), "param_states": param_states}}}
    # Written last: t5x (and load_t5x) trust a directory that has it.
    storage.write_bytes(storage.join(tmp, CHECKPOINT_FILE),
                        serialization.msgpack_serialize(tree))
