"""Online (GRPO) and semi-online (ReST re-Grown every k steps) training after BC.

The loop uses ReST's own parts: the Grow sampler draws N samples per prompt from the current
policy, the run's reward scores them, the Trainer (one jitted, sharded step) updates the
policy, and each evaluation writes a summary row (validation, test and the cumulative samples
and FLOPs of ``rest_jax.online.cost``). Every ``regrow_every`` (k) steps it samples k x B fresh
training prompts (B = ``OnlineConfig.prompts_per_step``; prompts in a seeded order, a new
permutation each pass) x N; step j of the round trains on slice j (B x N rows).

Per-sample advantages A `[B * N]` weight the policy-gradient loss on the sampled tokens:

  * "online": A = (r - mean_prompt(r)) / (std_prompt(r) + 1e-6) over each prompt's N samples
    (GRPO's group-relative advantage; N >= 2);
  * "semi_online": A = 1 if r >= ``threshold`` else 0 (ReST's filter; the loss is BC on the kept
    samples).

loss = -sum_{b,t} A_b w_bt log pi(y_bt) / sum w + kl_coef * mean_t k3(log pi_start - log pi),
with w the sampled tokens (EOS included) and k3(d) = exp(d) - d - 1 (Schulman's unbiased
KL(pi || pi_start) estimator on the sampled tokens). The samples are fixed by the run's seed, the
round and the prompt, so a rerun gives the same rows. The loop is not resumable mid-way: a
rerun of an unfinished loop starts it again from BC (a finished one is read back).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rest_jax.config import RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.improve.losses import Loss, target_weights, token_logprobs, token_metrics
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.online import cost as costs
from rest_jax.parallel import distributed
from rest_jax.tasks import data

logger = logging.getLogger("rest_jax")
EPS = 1e-6


def check(config: RunConfig, num_batch_shards: int = 1) -> None:
  """Raises one RestJaxError line naming the knob of an impossible online / semi-online config."""
  o, n = config.online, config.grow.sampling.num_samples
  if config.algorithm == "online":
    if n < 2:
      raise RestJaxError(f"algorithm 'online' needs SamplingConfig.num_samples >= 2 (group-"
                         f"relative advantages compare a prompt's samples), got {n}.")
    if o.regrow_every != 1:
      raise RestJaxError(f"algorithm 'online' samples every step: set OnlineConfig.regrow_every "
                         f"= 1 (got {o.regrow_every}), or use algorithm 'semi_online'.")
  rows = o.prompts_per_step * n
  if rows % num_batch_shards:
    raise RestJaxError(f"OnlineConfig.prompts_per_step x SamplingConfig.num_samples = {rows} "
                       f"is not divisible by the {num_batch_shards} batch shards (mesh data x "
                       "fsdp); choose a prompts_per_step that makes it a multiple.")


def advantages(rewards: np.ndarray, num_samples: int, *, algorithm: str,
               threshold: float) -> np.ndarray:
  """float32 `[B * N]` advantages of rewards `[B * N]` (row b * N + n: prompt b, sample n)."""
  r = np.asarray(rewards, np.float64).reshape(-1, num_samples)
  if algorithm == "online":
    a = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + EPS)
  else:
    a = (r >= threshold).astype(np.float64)
  return a.reshape(-1).astype(np.float32)


def make_loss(kl_coef: float) -> Loss:
  """The policy-gradient loss (module docstring). The batch holds "inputs", "targets" (the
  samples, `[rows, target_len]`), "advantage" `[rows]` and, with ``kl_coef`` > 0,
  "start_logprobs" `[rows, target_len]` (the start policy's log-probs of the samples)."""

  def fn(logits, batch, loss_params):
    del loss_params
    targets = batch["targets"]
    weights = target_weights(targets)
    logp = token_logprobs(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    pg = -(batch["advantage"][:, None] * logp * weights).sum() / denom
    loss, kl = pg, jnp.zeros(())
    if kl_coef > 0:
      d = batch["start_logprobs"] - logp
      kl = ((jnp.exp(d) - d - 1.0) * weights).sum() / denom
      loss = pg + kl_coef * kl
    metrics = token_metrics(logits, targets, weights, loss)
    metrics.update(pg_loss=pg, kl=kl, mean_advantage=batch["advantage"].mean())
    return loss, metrics

  return Loss(fn=fn)


@dataclasses.dataclass
class _Round:
  """One round's samples: k x B prompts x N, as training rows."""

  inputs: np.ndarray  # int32 [k * B * N, input_len]
  targets: np.ndarray  # int32 [k * B * N, target_len]
  advantage: np.ndarray  # float32 [k * B * N]
  start_logprobs: np.ndarray | None  # float32 [k * B * N, target_len]
  mean_reward: float


def _prompt_order(num_prompts: int, seed: int, start: int, count: int) -> np.ndarray:
  """Prompt indices ``start .. start + count`` of an endless stream of seeded permutations."""
  out = []
  for position in range(start, start + count):
    epoch, offset = divmod(position, num_prompts)
    out.append(np.random.default_rng([seed, epoch]).permutation(num_prompts)[offset])
  return np.asarray(out)


def _sample_round(run: Any, params: nnx.State, start_params: nnx.State | None,
                  prompts: list[dict], r: int) -> _Round:
  """Round ``r``'s samples from ``params``, scored; start-policy log-probs for the KL."""
  c, o = run.config, run.config.online
  n = c.grow.sampling.num_samples
  count = o.regrow_every * o.prompts_per_step
  chosen = [prompts[i] for i in _prompt_order(len(prompts), c.seed, r * count, count)]
  inputs = data.pad_rows([p["inputs"] for p in chosen], c.input_len)
  ids = np.asarray([int(p["example_id"]) for p in chosen], np.int64)
  sampler = run.parts.grow_sampler
  out = sampler.generate(sampler.place_params(params), inputs, ids, seed=c.seed, grow_step=r + 1)
  texts = data.detokenize(run.vocab, out.tokens, out.lengths)
  rewards = np.asarray(run.reward([p["inputs_pretokenized"] for p in chosen for _ in range(n)],
                                  texts,
                                  [p["targets_pretokenized"] for p in chosen for _ in range(n)]))
  targets = np.zeros((len(texts), c.target_len), np.int32)
  targets[:, :out.tokens.shape[1]] = out.tokens
  rows_inputs = np.repeat(inputs, n, axis=0)
  start_logprobs = None
  if o.kl_coef > 0:
    start_logprobs = sampler.score(sampler.place_params(start_params), rows_inputs, targets)
  return _Round(rows_inputs, targets, advantages(rewards, n, algorithm=c.algorithm,
                                                 threshold=o.threshold),
                start_logprobs, float(rewards.mean()))


def run_online(run: Any, start_params: nnx.State, *, start_cost: costs.Cost,
               evaluate: Any) -> tuple[list[dict], nnx.State]:
  """Trains ``config.online.num_steps`` steps from ``start_params`` (BC's); returns a summary
  row per evaluation (``evaluate(name, params, info) -> row``; ``info`` holds the cumulative
  cost) and the final params.
  """
  c, o = run.config, run.config.online
  if jax.process_count() > 1:
    raise RestJaxError(f"algorithm {c.algorithm!r} runs on one host; run it on one process "
                       "(multi-host online training is not supported yet).")
  check(c, run.layout.num_batch_shards)
  prompts = data.examples(run.task, "train", input_len=c.input_len, target_len=c.target_len)
  if c.grow.unlabeled_split:
    prompts += data.examples(run.task, c.grow.unlabeled_split, input_len=c.input_len,
                             target_len=c.target_len)
  train_cfg = dataclasses.replace(
      c.improve.train, num_steps=o.num_steps, eval_every=o.eval_every,
      warmup_steps=min(c.improve.train.warmup_steps, o.num_steps - 1))
  trainer = Trainer(run.graphdef, run.layout, make_loss(o.kl_coef), make_optimizer(train_cfg))
  state = trainer.init(start_params)
  p = costs.num_params(start_params)
  rows_per_step = o.prompts_per_step * c.grow.sampling.num_samples
  cost, rows, current = start_cost, [], None
  for step in range(o.num_steps):
    r, j = divmod(step, o.regrow_every)
    if j == 0:
      current = _sample_round(run, state.params, start_params if o.kl_coef else None, prompts, r)
      cost += costs.sampling(len(current.advantage), input_len=c.input_len,
                             decode_len=c.grow.sampling.max_decode_len, params=p)
      logger.info("%s round %d: %d samples, mean reward %.4f", c.algorithm, r + 1,
                  len(current.advantage), current.mean_reward)
    part = slice(j * rows_per_step, (j + 1) * rows_per_step)
    batch = {"inputs": current.inputs[part], "targets": current.targets[part],
             "advantage": current.advantage[part]}
    if current.start_logprobs is not None:
      batch["start_logprobs"] = current.start_logprobs[part]
    state, metrics = trainer.train_step(state, batch)
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
      raise RestJaxError(f"{c.algorithm} training diverged at step {step + 1} (loss {loss}); "
                         "lower ImproveConfig.train.learning_rate or OnlineConfig.kl_coef.")
    run.reporter.scalars(c.algorithm, step + 1, {k: float(v) for k, v in
                                                 jax.device_get(metrics).items()})
    cost += costs.training(1, batch_size=rows_per_step, input_len=c.input_len,
                           target_len=c.target_len, params=p)
    if (step + 1) % o.eval_every == 0 or step + 1 == o.num_steps:
      rows.append(evaluate(f"{c.algorithm} step {step + 1}", state.params, dict(
          grow_step=r + 1, improve_step=step + 1, train_examples=(step + 1) * rows_per_step,
          cost=cost, train_loss=loss)))
  distributed.barrier(f"{c.algorithm} done")
  return rows, state.params


def phase_cost(run: Any, kind: str, name: str, grow_step: int = 0) -> costs.Cost:
  """What a finished ReST phase spent (read back from the workdir, so resumes count it too):
  BC / Improve from their last checkpoint's step, Grow from its stats' sample count."""
  c = run.config
  p = costs.num_params(run.parts.abstract_params)
  if kind == "grow":
    samples = growdata.read_stats(run.workdir.grow_dir(grow_step)).num_samples
    return costs.sampling(samples, input_len=c.input_len,
                          decode_len=c.grow.sampling.max_decode_len, params=p)
  with run.checkpoints(name) as ckpt:
    latest = ckpt.latest()
  batch_size = c.bc.batch_size if kind == "bc" else c.improve.train.batch_size
  return costs.training(latest[0] if latest else 0, batch_size=batch_size,
                        input_len=c.input_len, target_len=c.target_len, params=p)


def online_phase(run: Any, start_params: nnx.State, start_cost: costs.Cost) -> list[dict]:
  """The online / semi-online loop after BC as a phase: its rows, read back once finished."""
  from rest_jax.pipeline import phases  # pylint: disable=g-import-not-at-top (cycle)

  name = run.config.algorithm
  done = run.workdir.marked(name)
  if done is not None:
    return done["rows"]

  def evaluate(label: str, params: nnx.State, info: dict) -> dict:
    metrics = {k: float(v) for k, v in run.eval_fn(params).items()}
    metrics.update(phases.evaluate_test(run, label, params))
    logger.info("%s: eval reward %.4f, train loss %.4f", label, metrics["eval_reward"],
                info["train_loss"])
    return {**phases.row(run, phase=name, grow_step=info["grow_step"],
                         improve_step=info["improve_step"],
                         train_examples=info["train_examples"], metrics=metrics),
            **info["cost"].as_row()}

  rows, params = run_online(run, start_params, start_cost=start_cost, evaluate=evaluate)
  with run.checkpoints(name) as ckpt:  # The final params (restore_best(name) reads them).
    ckpt.save_best(run.config.online.num_steps, params,
                   {k: v for k, v in rows[-1].items() if k.startswith("eval_")
                    and isinstance(v, float)})
  phases.mark(run, name, {**rows[-1], "rows": rows})
  return rows
