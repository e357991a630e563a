"""Training a RewardModel on scored pairs (x, y, score): data loading, split, fit, Kendall tau.

Scored pairs come from a ReST workdir (every record of its Grow datasets, scored by the run's
reward) or from a JSONL file with one {"source", "hypothesis", "score"} object per line
("example_id" optional; ``rest-jax inspect --jsonl`` exports with inputs_pretokenized /
targets_pretokenized / reward, which are accepted too). The held-out split is by example id (by
source text when there is none), so held-out sources are never seen in training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models.base import ModelConfig
from rest_jax.models.scalar_head import RewardModel
from rest_jax.rewards.fitting import (META, EncodedPairs, RewardTrainConfig, fit_reward_model,
                                      kendall_tau, write_reward_model_dir)

__all__ = ["EncodedPairs", "RewardTrainConfig", "ScoredPairs", "encode_pairs", "export_arrays",
           "init_from_policy", "kendall_tau", "load_scored_pairs", "split_pairs",
           "train_reward_model"]
from rest_jax.rewards.learned import encode, vocabulary_info
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import layout_from_config

logger = logging.getLogger("rest_jax")


@dataclasses.dataclass(frozen=True)
class ScoredPairs:
  """`[n]` sources, hypotheses, scores in [0, 1] and the group id used for the split."""

  sources: list[str]
  hypotheses: list[str]
  scores: np.ndarray
  groups: np.ndarray

  def take(self, index: np.ndarray) -> ScoredPairs:
    return ScoredPairs([self.sources[i] for i in index], [self.hypotheses[i] for i in index],
                       self.scores[index], self.groups[index])

  def __len__(self) -> int:
    return len(self.hypotheses)


def _group(example_id: Any, source: str) -> int:
  key = str(example_id) if example_id is not None else "src:" + source
  return zlib.crc32(key.encode("utf-8"))


def load_scored_pairs(path: str | Sequence[str], *,
                      score_range: tuple[float, float] = (0.0, 1.0)) -> ScoredPairs:
  """Scored pairs of workdirs (their Grow records) and/or JSONL files; duplicates are dropped.

  ``path`` is one path or several, read in order; a (source, hypothesis) pair seen again keeps
  its first score.

  Raises:
    RestJaxError: missing path, malformed JSONL line, or a score outside ``score_range``.
  """
  paths = [path] if isinstance(path, str) else list(path)
  rows: list[tuple[str, str, float, Any]] = []
  for path in paths:
    if storage.isdir(path):
      from rest_jax.grow import dataset as growdata  # pylint: disable=g-import-not-at-top
      from rest_jax.cli import inspection  # pylint: disable=g-import-not-at-top
      steps = inspection.grow_dirs(path)
      for _, directory in steps:
        for r in growdata.read_records(directory):
          rows.append((r.inputs_pretokenized, r.targets_pretokenized, r.reward, r.example_id))
    elif storage.exists(path):
      with storage.open_read(path, "r") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
            source = obj.get("source", obj.get("inputs_pretokenized"))
            hyp = obj.get("hypothesis", obj.get("targets_pretokenized"))
            value = float(obj["score"] if "score" in obj else obj["reward"])
            if not isinstance(source, str) or not isinstance(hyp, str):
              raise KeyError("source/hypothesis")
          except (ValueError, KeyError, TypeError) as e:
            raise RestJaxError(f"{path}:{line_no} is not a scored pair ({e}); each line must be a "
                               'JSON object {"source": str, "hypothesis": str, "score": number}.'
                               ) from None
          rows.append((source, hyp, value, obj.get("example_id")))
    else:
      raise RestJaxError(f"{path} is neither a ReST workdir nor a JSONL file; pass a workdir with "
                         "Grow data or a JSONL of scored pairs.")
  path = ", ".join(paths)
  if not rows:
    raise RestJaxError(f"{path} has no scored pairs; run a Grow step first or fill the JSONL.")
  seen, unique = set(), []
  for row in rows:
    if (row[0], row[1]) not in seen:
      seen.add((row[0], row[1]))
      unique.append(row)
  lo, hi = score_range
  scores = (np.asarray([r[2] for r in unique], np.float64) - lo) / (hi - lo)
  bad = np.flatnonzero(~np.isfinite(scores) | (scores < 0) | (scores > 1))
  if bad.size:
    raise RestJaxError(f"score {unique[bad[0]][2]} of pair {bad[0]} in {path} is outside the "
                       f"declared range {score_range}; pass --range LO HI.")
  return ScoredPairs([r[0] for r in unique], [r[1] for r in unique], scores.astype(np.float32),
                     np.asarray([_group(r[3], r[0]) for r in unique], np.int64))


def split_pairs(pairs: ScoredPairs, *, held_out_fraction: float) -> tuple[ScoredPairs,
                                                                          ScoredPairs]:
  """(train, held_out): a pair is held out when its group hashes below the fraction."""
  held = (pairs.groups % 10_000) < int(round(held_out_fraction * 10_000))
  return pairs.take(np.flatnonzero(~held)), pairs.take(np.flatnonzero(held))


def init_from_policy(params: nnx.State, checkpoint: str, *, model: ModelConfig,
                     layout: Layout) -> tuple[nnx.State, int]:
  """Copies the shared trunk (embedder, encoder, decoder layers and norm) of a saved T5 policy.

  Args:
    params: the RewardModel's params `nnx.State`.
    checkpoint: a policy params checkpoint (e.g. ``W/checkpoints/bc/best/<step>/params``) of an
      encoder-decoder with the ModelConfig ``model``.
    A reward-model directory (from ``train_reward_model``) continues its training instead.
  Returns:
    the params with every leaf of the same path and shape replaced, and how many were.
  """
  from rest_jax.checkpoints import phases as checkpoints  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import learned  # pylint: disable=g-import-not-at-top
  if storage.exists(storage.join(checkpoint, learned.META)):
    restored = checkpoints.restore_params(storage.join(checkpoint, learned.PARAMS),
                                          learned.abstract_params(model, layout))
    return restored, len(jax.tree.leaves(restored))
  from rest_jax.models.t5 import T5Model  # pylint: disable=g-import-not-at-top
  state = nnx.state(nnx.eval_shape(lambda: T5Model(model, rngs=nnx.Rngs(0))))
  policy = checkpoints.restore_params(checkpoint, layout.abstract_state(state)).to_pure_dict()
  mine, copied = params.to_pure_dict(), [0]

  def merge(dst, src):
    for key, value in dst.items():
      if key not in src:
        continue
      if isinstance(value, dict):
        merge(value, src[key])
      elif getattr(src[key], "shape", None) == value.shape:
        dst[key] = src[key]
        copied[0] += 1

  merge(mine, policy)
  nnx.replace_by_pure_dict(params, mine)
  return params, copied[0]


def encode_pairs(pairs: ScoredPairs, vocab: Any, *, input_len: int,
                 target_len: int) -> EncodedPairs:
  """Token ids of ``pairs`` under ``vocab`` (EOS-terminated, truncated, right-padded)."""
  return EncodedPairs(encode(vocab, pairs.sources, input_len),
                      encode(vocab, pairs.hypotheses, target_len), pairs.scores)


def export_arrays(path: str, pairs: ScoredPairs, *, model: ModelConfig, vocab: Any,
                  cfg: RewardTrainConfig) -> dict[str, int]:
  """Writes the encoded train / held-out split to ``path`` (.npz) for a fit elsewhere.

  The file holds {train,held}_{inputs,targets,scores} and a JSON "meta" string with the
  ModelConfig, the vocabulary description and the lengths; ``launch/fit_reward_arrays.py``
  reads it. Returns the split sizes.
  """
  train, held = split_pairs(pairs, held_out_fraction=cfg.held_out_fraction)
  arrays = {}
  for name, part in (("train", train), ("held", held)):
    enc = encode_pairs(part, vocab, input_len=cfg.input_len, target_len=cfg.target_len)
    arrays.update({f"{name}_inputs": enc.inputs, f"{name}_targets": enc.targets,
                   f"{name}_scores": enc.scores})
  meta = {"model": dataclasses.asdict(model), "vocabulary": vocabulary_info(vocab),
          "input_len": cfg.input_len, "target_len": cfg.target_len}
  with storage.open_write(path, "wb") as f:
    np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), **arrays)
  return {"train_pairs": len(train), "held_out_pairs": len(held)}


def train_reward_model(pairs: ScoredPairs, *, model: ModelConfig, vocab: Any,
                       cfg: RewardTrainConfig, output_dir: str, layout: Layout | None = None,
                       init_from: str | None = None, progress: bool = True) -> dict[str, float]:
  """Fits a RewardModel to ``pairs`` (``fitting.fit_reward_model``) and saves it.

  ``init_from`` (optional) is a policy params checkpoint whose trunk initialises the model, or
  a reward-model directory to continue.

  Returns:
    metrics: train/held-out sizes, final train loss, held-out Kendall tau and mean absolute
      error against the scores, parameter count, training seconds and the held-out tau curve
      (also stored in reward_model.json).
  """
  train, held = split_pairs(pairs, held_out_fraction=cfg.held_out_fraction)
  if len(train) == 0 or len(held) == 0:
    raise RestJaxError(f"the split of {len(pairs)} pairs left {len(train)} for training and "
                       f"{len(held)} held out; add data or change --held_out_fraction.")
  if storage.exists(storage.join(output_dir, META)):
    raise RestJaxError(f"{output_dir} already holds a reward model; choose a new --output_dir "
                       "or delete it.")
  layout = layout or layout_from_config(MeshConfig())
  params = None
  if init_from:
    _, params = nnx.split(RewardModel(model, rngs=nnx.Rngs(cfg.seed)))
    params, copied = init_from_policy(params, init_from, model=model, layout=layout)
    logger.info("reward model: %d parameter arrays initialised from %s", copied, init_from)
  enc = dict(input_len=cfg.input_len, target_len=cfg.target_len)
  params, metrics, curve = fit_reward_model(
      encode_pairs(train, vocab, **enc), encode_pairs(held, vocab, **enc), model=model, cfg=cfg,
      layout=layout, params=params, progress=progress)
  metrics = dict(metrics, curve=curve)
  write_reward_model_dir(output_dir, params, model=model, vocabulary=vocabulary_info(vocab),
                         metrics=metrics, **enc)
  return metrics
