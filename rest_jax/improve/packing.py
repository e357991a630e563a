"""Sequence packing for training (``TrainConfig.packing``): several examples per model row.

A training batch keeps its examples (``"inputs"`` `[batch, input_len]`, ``"targets"``,
``"reward"``, ``"behaviour_logprobs"``, ...: the losses read them unchanged); ``pack_batch`` adds
the packed rows the model runs on, under seqio's ``trim_and_pack`` names with a ``packed_``
prefix:

  * ``"packed_inputs"`` int32 `[rows, input_len]`, ``"packed_targets"`` int32 `[rows, target_len]`:
    the examples' prompts and targets, each example's at the same row, one after another;
  * ``"packed_{inputs,targets}_segment_ids"`` / ``"packed_{inputs,targets}_positions"`` int32
    (``models.base.Segments``: segment k + 1 for the row's k-th example, 0 on padding;
    positions restart at 0 per segment);
  * ``"packed_row"`` int32 `[batch]` (the example's row inside its group) and
    ``"packed_offset"`` int32 `[batch]` (the column of its first target).

Examples are packed by groups: group g is the ``batch / groups`` examples of batch shard g (the
rows one device holds), packed in order, first fit, into rows ``scale`` times as long as the
unpacked ones (``TrainConfig.packing_scale``; every example fits in a row). Every group gets the
same number of rows: the most any group needs, rounded up to a multiple of an eighth of the
group (at most 8 shapes to compile), agreed by all hosts. When rows x scale would exceed the
group (more token columns than unpacked: long examples with ``scale`` > 1), the batch runs
unpacked, so packing never computes more token columns. The packing is a function of the batch
and the mesh's batch shards only, not of the host count, and the data loader's position is
unchanged (a resumed phase continues with the same next batch).

``teacher_forced`` runs a model on a batch, packed or not, and returns its per-example outputs
`[batch, target_len, ...]`: packed outputs are gathered back from their segments (a gather
inside each group, so it stays on the device that holds the group). Every loss therefore sees
exactly the arrays of the unpacked batch; outputs at padding columns differ, and the losses
weight them by 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rest_jax.errors import RestJaxError
from rest_jax.models.base import PAD_ID, Segments

PACKED_KEYS = ("packed_inputs", "packed_inputs_segment_ids", "packed_inputs_positions",
               "packed_targets", "packed_targets_segment_ids", "packed_targets_positions",
               "packed_row", "packed_offset")
SHAPES_PER_GROUP = 8  # Row counts are rounded up to multiples of group / 8.


def _lengths(tokens: np.ndarray, minimum: int) -> np.ndarray:
  """int64 `[n]`: index of the last non-pad token + 1 of each row (at least ``minimum``)."""
  columns = np.arange(1, tokens.shape[1] + 1)
  return np.maximum((np.where(tokens != PAD_ID, columns, 0)).max(axis=1, initial=0), minimum)


def first_fit(input_lens: np.ndarray, target_lens: np.ndarray, input_len: int,
              target_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Packs examples in order, each into the first row with room for its prompt and targets.

  Args:
    input_lens / target_lens: int `[n]` tokens of each example (each within the row lengths).
    input_len / target_len: the row lengths.
  Returns:
    int64 `[n]` row of each example, int64 `[n]` its first input column, int64 `[n]` its first
    target column, and the number of rows used.
  """
  used_in, used_tgt = [], []
  rows = np.zeros(len(input_lens), np.int64)
  in_start, tgt_start = np.zeros_like(rows), np.zeros_like(rows)
  for e, (a, b) in enumerate(zip(input_lens.tolist(), target_lens.tolist())):
    r = next((r for r in range(len(used_in))
              if used_in[r] + a <= input_len and used_tgt[r] + b <= target_len), len(used_in))
    if r == len(used_in):
      used_in.append(0)
      used_tgt.append(0)
    rows[e], in_start[e], tgt_start[e] = r, used_in[r], used_tgt[r]
    used_in[r] += a
    used_tgt[r] += b
  return rows, in_start, tgt_start, len(used_in)


def rows_per_group(needed: int, group: int) -> int:
  """``needed`` rounded up to a multiple of ``ceil(group / SHAPES_PER_GROUP)`` (at most group)."""
  step = max(1, math.ceil(group / SHAPES_PER_GROUP))
  return min(group, step * math.ceil(needed / step))


def _agree(rows: int) -> int:
  """The largest ``rows`` of all hosts (every host calls this in the same step)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(rows))))


def pack_batch(batch: Mapping[str, np.ndarray], *, groups: int, scale: int = 1,
               agree: Callable[[int], int] = _agree) -> dict[str, np.ndarray]:
  """``batch`` plus its packed rows (the ``PACKED_KEYS``; see the module docstring).

  Args:
    batch: this host's rows, "inputs" int `[n, input_len]`, "targets" int `[n, target_len]`
      (right-padded), and anything else (kept as it is).
    groups: the batch shards among this host's rows (``n`` must be a multiple of it).
    scale: packed rows are ``scale`` times as long as the batch's (``scale * input_len``
      input and ``scale * target_len`` target columns).
    agree: the row count every host uses, from this host's need (the maximum over hosts).
  Returns:
    a new dict with the packed arrays added: `[groups * rows_per_group, scale * length]`;
    without them when the packed rows would hold more token columns than the batch's (only
    with ``scale`` > 1: then the batch runs unpacked, with the same loss).
  """
  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  n = inputs.shape[0]
  input_len, target_len = scale * inputs.shape[1], scale * targets.shape[1]
  if groups < 1 or n % groups:
    raise RestJaxError(f"packing: {n} rows on this host do not split into {groups} batch "
                       "shards; choose a batch_size that is a multiple of the batch shards.")
  group = n // groups
  in_lens, tgt_lens = _lengths(inputs, 1), _lengths(targets, 0)
  plans = [first_fit(in_lens[g * group:(g + 1) * group], tgt_lens[g * group:(g + 1) * group],
                     input_len, target_len) for g in range(groups)]
  rows = agree(rows_per_group(max(p[3] for p in plans), group))
  if rows * scale > group:  # More token columns than unpacked: this batch runs unpacked.
    return dict(batch)
  out = {k: np.zeros((groups * rows, length), np.int32)
         for k, length in (("packed_inputs", input_len), ("packed_inputs_segment_ids", input_len),
                           ("packed_inputs_positions", input_len), ("packed_targets", target_len),
                           ("packed_targets_segment_ids", target_len),
                           ("packed_targets_positions", target_len))}
  packed_row, packed_offset = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for g, (row, in_start, tgt_start, _) in enumerate(plans):
    segment = np.zeros(rows, np.int64)
    for i in range(group):
      e, r = g * group + i, int(row[i])
      segment[r] += 1
      for side, tokens, start, length in (("inputs", inputs, in_start[i], in_lens[e]),
                                          ("targets", targets, tgt_start[i], tgt_lens[e])):
        cols = slice(start, start + length)
        out[f"packed_{side}"][g * rows + r, cols] = tokens[e, :length]
        out[f"packed_{side}_segment_ids"][g * rows + r, cols] = segment[r]
        out[f"packed_{side}_positions"][g * rows + r, cols] = np.arange(length)
      packed_row[e], packed_offset[e] = r, tgt_start[i]
  return {**batch, **out, "packed_row": packed_row, "packed_offset": packed_offset}


def fill(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Token columns holding a real token, unpacked and packed: {"unpacked", "packed"} in [0, 1]
  (inputs and targets together; needs a ``pack_batch`` output)."""
  if "packed_inputs" not in batch:  # Ran unpacked (pack_batch's fallback).
    batch = {**batch, "packed_inputs": batch["inputs"], "packed_targets": batch["targets"]}
  real = float(_lengths(np.asarray(batch["inputs"]), 0).sum()
               + _lengths(np.asarray(batch["targets"]), 0).sum())
  size = lambda *keys: sum(np.asarray(batch[k]).size for k in keys)
  return {"unpacked": real / size("inputs", "targets"),
          "packed": real / size("packed_inputs", "packed_targets")}


def unpack(out: jax.Array, row: jax.Array, offset: jax.Array, *, groups: int,
           length: int) -> jax.Array:
  """Per-example outputs from packed rows (traceable).

  Args:
    out: `[rows, target_len, ...]`, a model's outputs on packed rows (``groups`` equal groups).
    row / offset: int32 `[batch]`, ``"packed_row"`` / ``"packed_offset"``.
    groups: the number of groups (the batch's ``groups``, all hosts together).
    length: the unpacked target length.
  Returns:
    `[batch, length, ...]`: example e's outputs from its first target column on (columns past
    its row's end repeat the last one; they are padding of the unpacked targets).
  """
  rows, width = out.shape[:2]
  per_group = (rows // groups) * width
  flat = out.reshape((groups, per_group) + out.shape[2:])
  index = (row * width + offset)[:, None] + jnp.arange(length, dtype=jnp.int32)
  index = jnp.minimum(index, per_group - 1).reshape(groups, -1)
  index = index.reshape(index.shape + (1,) * (out.ndim - 2))
  picked = jnp.take_along_axis(flat, index, axis=1)
  return picked.reshape((row.shape[0], length) + out.shape[2:])


def segments_of(batch: Mapping[str, jax.Array]) -> Segments:
  """The ``Segments`` of a packed batch."""
  return Segments(batch["packed_inputs_segment_ids"], batch["packed_inputs_positions"],
                  batch["packed_targets_segment_ids"], batch["packed_targets_positions"])


def teacher_forced(model: Callable[..., jax.Array], batch: Mapping[str, Any], *,
                   groups: int) -> jax.Array:
  """``model(inputs, targets)`` `[batch, target_len, ...]` of a batch, packed or not.

  A packed batch (``pack_batch``) runs the model once on its packed rows and gathers each
  example's outputs back (``unpack``); ``groups`` is the batch's number of groups (all hosts).
  """
  if "packed_targets" not in batch:
    return model(batch["inputs"], batch["targets"])
  out = model(batch["packed_inputs"], batch["packed_targets"], segments_of(batch))
  return unpack(out, batch["packed_row"], batch["packed_offset"], groups=groups,
                length=batch["targets"].shape[1])
