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
import math
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models.base import ModelConfig
from rest_jax.models.scalar_head import RewardModel
from rest_jax.rewards.learned import encode, save_reward_model
from rest_jax.sharding import Layout, make_layout

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


def load_scored_pairs(path: str, *, score_range: tuple[float, float] = (0.0, 1.0)
                      ) -> ScoredPairs:
  """Scored pairs of a workdir (its Grow records) or a JSONL file; duplicates are dropped.

  Raises:
    RestJaxError: missing path, malformed JSONL line, or a score outside ``score_range``.
  """
  rows: list[tuple[str, str, float, Any]] = []
  if os.path.isdir(path):
    from rest_jax import growdata, inspection  # pylint: disable=g-import-not-at-top
    steps = inspection.grow_dirs(path)
    for _, directory in steps:
      for r in growdata.read_records(directory):
        rows.append((r.inputs_pretokenized, r.targets_pretokenized, r.reward, r.example_id))
  elif os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
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


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall's tau-b of two `[n]` arrays (scipy.stats.kendalltau when installed)."""
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    return float(stats.kendalltau(x, y).statistic)
  except ImportError:
    pass
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  concordant = tied_x = tied_y = total = 0.0
  for i in range(len(x) - 1):
    dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
    concordant += float(np.sum(dx * dy))
    tied_x += float(np.sum(dx == 0))
    tied_y += float(np.sum(dy == 0))
    total += len(dx)
  return concordant / math.sqrt((total - tied_x) * (total - tied_y))


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig:
  """Reward-model training settings (the `rest-jax train-reward` flags)."""

  num_steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  held_out_fraction: float = 0.1
  input_len: int = 64
  target_len: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.num_steps < 1 or self.batch_size < 1 or not 0 < self.held_out_fraction < 1:
      raise RestJaxError("train-reward needs num_steps >= 1, batch_size >= 1 and "
                         "0 < held_out_fraction < 1.")


def predict(model_fn: Any, params: nnx.State, vocab: Any, pairs: ScoredPairs, *,
            cfg: RewardTrainConfig, batch_size: int = 256) -> np.ndarray:
  """Rewards `[n]` of ``pairs`` under ``params`` (``model_fn(params, inputs, targets)``)."""
  batch_size = min(batch_size, -(-len(pairs) // 8) * 8)
  out = []
  for start in range(0, len(pairs), batch_size):
    x = encode(vocab, pairs.sources[start:start + batch_size], cfg.input_len)
    y = encode(vocab, pairs.hypotheses[start:start + batch_size], cfg.target_len)
    rows = x.shape[0]
    if rows < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - rows, x.shape[1]), np.int32)])
      y = np.concatenate([y, np.zeros((batch_size - rows, y.shape[1]), np.int32)])
    out.append(np.asarray(model_fn(params, x, y))[:rows])
  return np.concatenate(out)


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
  from rest_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import learned  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(checkpoint, learned.META)):
    restored = checkpoints.restore_params(os.path.join(checkpoint, learned.PARAMS),
                                          learned.abstract_params(model, layout))
    return restored, len(jax.tree.leaves(restored))
  from rest_jax.models.t5 import T5Model  # pylint: disable=g-import-not-at-top
  state = nnx.state(nnx.eval_shape(lambda: T5Model(model, rngs=nnx.Rngs(0))))
  shardings = layout.state_shardings(state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                          shardings)
  policy = checkpoints.restore_params(checkpoint, abstract).to_pure_dict()
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


def train_reward_model(pairs: ScoredPairs, *, model: ModelConfig, vocab: Any,
                       cfg: RewardTrainConfig, output_dir: str, layout: Layout | None = None,
                       init_from: str | None = None) -> dict[str, float]:
  """Fits a RewardModel to ``pairs`` (sigmoid cross-entropy on soft scores), saves it.

  ``init_from`` (optional) is a policy params checkpoint whose trunk initialises the model.

  Returns:
    metrics: train/held-out sizes, final train loss, held-out Kendall tau and mean absolute
      error against the scores, parameter count and training seconds (also stored in
      reward_model.json).
  """
  train, held = split_pairs(pairs, held_out_fraction=cfg.held_out_fraction)
  if len(train) == 0 or len(held) == 0:
    raise RestJaxError(f"the split of {len(pairs)} pairs left {len(train)} for training and "
                       f"{len(held)} held out; add data or change --held_out_fraction.")
  layout = layout or make_layout()
  rm = RewardModel(model, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(rm)
  if init_from:
    params, copied = init_from_policy(params, init_from, model=model, layout=layout)
    logger.info("reward model: %d parameter arrays initialised from %s", copied, init_from)
  params = jax.device_put(params, layout.state_shardings(params))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate,
                                                max(1, min(cfg.warmup_steps, cfg.num_steps - 1)),
                                                cfg.num_steps)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(params)

  def loss_fn(p, x, y, s):
    logits = nnx.merge(graphdef, p).logits(x, y)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, s))

  @jax.jit
  def step(p, o, x, y, s):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, s)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  @jax.jit
  def forward(p, x, y):
    return nnx.merge(graphdef, p)(x, y)

  rng = np.random.default_rng(cfg.seed)
  x_all = encode(vocab, train.sources, cfg.input_len)
  y_all = encode(vocab, train.hypotheses, cfg.target_len)
  batch = min(cfg.batch_size, len(train))
  start_time, losses = time.time(), []
  for i in range(cfg.num_steps):
    idx = rng.integers(0, len(train), batch)
    params, opt_state, loss = step(params, opt_state, x_all[idx], y_all[idx], train.scores[idx])
    losses.append(loss)
    if (i + 1) % 200 == 0:
      logger.info("reward model step %d: loss %.4f", i + 1, float(np.mean(losses[-200:])))
  train_seconds = time.time() - start_time
  predicted = predict(forward, params, vocab, held, cfg=cfg)
  metrics = {"train_pairs": len(train), "held_out_pairs": len(held),
             "final_train_loss": float(np.mean(losses[-50:])),
             "held_out_kendall_tau": kendall_tau(predicted, held.scores),
             "held_out_mae": float(np.mean(np.abs(predicted - held.scores))),
             "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
             "train_seconds": round(train_seconds, 1)}
  save_reward_model(output_dir, params, model=model, vocab=vocab, input_len=cfg.input_len,
                    target_len=cfg.target_len, metrics=metrics)
  return metrics
