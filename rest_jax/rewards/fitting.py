"""Fitting a RewardModel to encoded scored pairs: the training loop behind `rest-jax train-reward`.

Everything here needs only jax, flax, optax, orbax and numpy (no seqio, TensorFlow or gin), so a
fit can run on an accelerator host that lacks the data stack: `rest-jax train-reward
--export_arrays F.npz` encodes and splits the pairs on a CPU host, and
``launch/fit_reward_arrays.py F.npz OUT_DIR`` fits and writes a reward-model directory there.

The loss is sigmoid cross-entropy of the model's logit against the soft score in [0, 1], plus,
with ``ranking_weight`` > 0, a pairwise logistic ranking loss over the pairs of each batch whose
scores differ (what Kendall tau measures): ``softplus(-(l_i - l_j))`` for every pair with
``s_i > s_j``. Training runs ``steps_per_call`` optimizer steps per jitted call (a ``lax.scan``
over batches drawn on device from a key), so small models are not limited by dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import stats
from tqdm.auto import tqdm

from rest_jax.checkpoints import phases as checkpoints
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models.base import ModelConfig
from rest_jax.models.scalar_head import RewardModel
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import layout_from_config

logger = logging.getLogger("rest_jax")

META = "reward_model.json"
PARAMS = "params"


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
  ranking_weight: float = 0.0  # weight of the in-batch pairwise ranking loss
  weight_decay: float = 0.0  # AdamW decoupled weight decay
  eval_every: int = 0  # held-out Kendall tau every this many steps (0: only at the end)
  steps_per_call: int = 50  # optimizer steps per jitted call
  max_seconds: float = 0.0  # stop (and save) after this much training time (0: no limit)

  def __post_init__(self):
    if self.num_steps < 1 or self.batch_size < 1 or not 0 < self.held_out_fraction < 1:
      raise RestJaxError("train-reward needs num_steps >= 1, batch_size >= 1 and "
                         "0 < held_out_fraction < 1.")
    if self.ranking_weight < 0 or self.weight_decay < 0 or self.eval_every < 0:
      raise RestJaxError("train-reward needs ranking_weight >= 0, weight_decay >= 0 and "
                         "eval_every >= 0.")
    if self.max_seconds < 0:
      raise RestJaxError(f"max_seconds={self.max_seconds} must be >= 0 (0: no limit).")
    if self.steps_per_call < 1:
      raise RestJaxError(f"steps_per_call={self.steps_per_call} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
  """Encoded scored pairs: sources int32 `[n, input_len]`, hypotheses int32 `[n, target_len]`
  (right-padded, EOS-terminated) and scores float32 `[n]` in [0, 1]."""

  inputs: np.ndarray
  targets: np.ndarray
  scores: np.ndarray

  def __len__(self) -> int:
    return int(self.scores.shape[0])


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall's tau-b of two `[n]` arrays (scipy, which jax depends on)."""
  return float(stats.kendalltau(x, y).statistic)


def reward_losses(logits: jax.Array, scores: jax.Array, *, ranking_weight: float
                  ) -> tuple[jax.Array, jax.Array]:
  """(total loss, ranking loss) of logits and soft scores, both float32 `[batch]`.

  total = mean sigmoid cross-entropy + ranking_weight * mean over the ordered pairs (i, j) with
  scores[i] > scores[j] of softplus(logits[j] - logits[i]) (0 when all scores tie).
  """
  ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, scores))
  better = (scores[:, None] > scores[None, :]).astype(jnp.float32)
  pair = jax.nn.softplus(logits[None, :] - logits[:, None])
  ranking = jnp.sum(better * pair) / jnp.maximum(jnp.sum(better), 1.0)
  return ce + ranking_weight * ranking, ranking


def make_predict(graphdef: Any, *, batch_size: int = 256) -> Any:
  """``predict(params, pairs) -> float32 [n]`` rewards in (0, 1), one compiled batch shape."""

  @jax.jit
  def forward(params, x, y):
    return nnx.merge(graphdef, params)(x, y)

  def predict(params: nnx.State, pairs: EncodedPairs) -> np.ndarray:
    size = min(batch_size, -(-len(pairs) // 8) * 8)
    out = []
    for start in range(0, len(pairs), size):
      x, y = pairs.inputs[start:start + size], pairs.targets[start:start + size]
      rows = x.shape[0]
      if rows < size:
        x = np.concatenate([x, np.zeros((size - rows, x.shape[1]), np.int32)])
        y = np.concatenate([y, np.zeros((size - rows, y.shape[1]), np.int32)])
      out.append(np.asarray(forward(params, x, y))[:rows])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  return predict


def _optimizer(cfg: RewardTrainConfig) -> optax.GradientTransformation:
  """AdamW on a warm-up + cosine schedule (constant for a one-step fit)."""
  schedule = (optax.constant_schedule(cfg.learning_rate) if cfg.num_steps == 1 else
              optax.warmup_cosine_decay_schedule(
                  0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.num_steps - 1),
                  cfg.num_steps))
  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def _scanned_steps(graphdef: nnx.GraphDef, layout: Layout, tx: optax.GradientTransformation,
                   train: EncodedPairs, cfg: RewardTrainConfig) -> Callable:
  """``run(params, opt_state, key, start, num) -> (params, opt_state, losses [num])``: ``num``
  optimizer steps in one jitted ``lax.scan``, each on a batch drawn on the device from
  ``fold_in(key, step)`` (with replacement, sharded over the batch axis)."""
  batch = cfg.batch_size
  shard = layout.num_batch_shards
  if batch % shard:
    raise RestJaxError(f"reward batch_size {batch} must divide over the {shard} batch shards of "
                       f"the mesh; use a multiple of {shard}.")
  data = tuple(jax.device_put(np.asarray(a)) for a in (train.inputs, train.targets,
                                                       train.scores))

  def one_step(carry, step):
    p, o, key = carry
    idx = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, len(train))
    x, y, s = (jax.lax.with_sharding_constraint(a[idx], layout.batch_sharding(
        (batch,) + a.shape[1:])) for a in data)

    def loss_fn(q):
      loss, _ = reward_losses(nnx.merge(graphdef, q).logits(x, y), s,
                              ranking_weight=cfg.ranking_weight)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return (optax.apply_updates(p, updates), o, key), loss

  @functools.partial(jax.jit, static_argnames="num", donate_argnums=(0, 1))
  def run(p, o, key, start, num):
    (p, o, _), losses = jax.lax.scan(one_step, (p, o, key), start + jnp.arange(num))
    return p, o, losses

  return run


def fit_reward_model(train: EncodedPairs, held: EncodedPairs, *, model: ModelConfig,
                     cfg: RewardTrainConfig, layout: Layout | None = None,
                     params: nnx.State | None = None, progress: bool = True
                     ) -> tuple[nnx.State, dict[str, float], list[dict[str, float]]]:
  """Fits a RewardModel on ``train`` and measures it on ``held``.

  Args:
    train / held: encoded pairs; ``held`` is only evaluated.
    model: the encoder-decoder ModelConfig.
    cfg: training settings; batches are drawn with replacement from a key of ``cfg.seed``.
    layout: mesh and sharding rules (default: all devices on the data axis).
    params: initial params (e.g. a policy trunk, or a reward model to continue); default a
      fresh ``RewardModel(model, rngs=nnx.Rngs(cfg.seed))``.
    progress: show a tqdm bar.
  Returns:
    (params, metrics, curve): metrics has train/held-out sizes, the final train loss, held-out
    Kendall tau and mean absolute error, the parameter count and training seconds; curve has
    {"step", "train_loss", "held_out_kendall_tau"} at every ``cfg.eval_every`` steps.
  """
  if len(train) == 0 or len(held) == 0:
    raise RestJaxError(f"{len(train)} training and {len(held)} held-out pairs; both must be "
                       "non-empty (add data or change --held_out_fraction).")
  layout = layout or layout_from_config(MeshConfig())
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(model,
                                                                    rngs=nnx.Rngs(cfg.seed))))
  if params is None:
    params = nnx.state(RewardModel(model, rngs=nnx.Rngs(cfg.seed)))
  params = jax.device_put(params, layout.state_shardings(abstract))
  tx = _optimizer(cfg)
  opt_state = tx.init(params)
  run = _scanned_steps(graphdef, layout, tx, train, cfg)
  predict = make_predict(graphdef)
  key = jax.random.key(cfg.seed)
  curve: list[dict[str, float]] = []
  losses: list[float] = []
  bar = tqdm(total=cfg.num_steps, desc="train-reward", dynamic_ncols=True,
             disable=not progress)
  start_time, step = time.time(), 0
  while step < cfg.num_steps:
    # Never run past the next evaluation or the end (one extra compile for a short tail).
    until = cfg.num_steps
    if cfg.eval_every:
      until = min(until, (step // cfg.eval_every + 1) * cfg.eval_every)
    num = min(cfg.steps_per_call, until - step)
    params, opt_state, chunk = run(params, opt_state, key, jnp.int32(step), num)
    losses.extend(np.asarray(chunk).tolist())
    step += num
    bar.update(num)
    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
      tau = kendall_tau(predict(params, held), held.scores)
      curve.append({"step": step, "train_loss": float(np.mean(losses[-cfg.eval_every:])),
                    "held_out_kendall_tau": tau})
      logger.info("reward model step %d: loss %.4f, held-out Kendall tau %.3f", step,
                  curve[-1]["train_loss"], tau)
    if cfg.max_seconds and time.time() - start_time > cfg.max_seconds and step < cfg.num_steps:
      logger.warning("reward model: stopped after %d of %d steps (max_seconds=%g)", step,
                     cfg.num_steps, cfg.max_seconds)
      break
  bar.close()
  train_seconds = time.time() - start_time
  predicted = predict(params, held)
  metrics = {"train_pairs": len(train), "held_out_pairs": len(held),
             "final_train_loss": float(np.mean(losses[-50:])),
             "held_out_kendall_tau": kendall_tau(predicted, held.scores),
             "held_out_mae": float(np.mean(np.abs(predicted - held.scores))),
             "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
             "num_steps": step, "train_seconds": round(train_seconds, 1)}
  if not curve or curve[-1]["step"] != step:
    curve.append({"step": step, "train_loss": metrics["final_train_loss"],
                  "held_out_kendall_tau": metrics["held_out_kendall_tau"]})
  return params, metrics, curve


def write_reward_model_dir(directory: str, params: nnx.State, *, model: ModelConfig,
                           vocabulary: Mapping[str, str], input_len: int, target_len: int,
                           metrics: Mapping[str, Any] | None = None) -> None:
  """Writes params (orbax) and reward_model.json into the new directory ``directory``.

  ``vocabulary`` is the JSON description ({"kind": "byte"} or {"kind": "sentencepiece",
  "path": ...}, see rest_jax.rewards.learned.vocabulary_info). The JSON is written last, so a
  directory without it is an unfinished write.
  """
  directory = storage.absolute(directory)
  if storage.exists(storage.join(directory, META)):
    raise RestJaxError(f"{directory} already holds a reward model; choose a new --output_dir "
                       "or delete it.")
  storage.makedirs(directory)
  checkpoints.save_pytree(storage.join(directory, PARAMS), params)
  meta = {"model": dataclasses.asdict(model), "vocabulary": dict(vocabulary),
          "input_len": input_len, "target_len": target_len, "metrics": dict(metrics or {})}
  storage.write_json(storage.join(directory, META), meta)
