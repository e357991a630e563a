"""The phases of a ReST run: BC, Grow and Improve, each a function of the built ``Run``.

Each phase reads what it needs from the workdir (finished phases' best checkpoints, the Grow
dataset) and records its end there: a Grow step by its dataset's ``COMPLETED`` marker, BC and
Improve steps by ``phases/{name}.json`` holding their summary row. ``Policies`` is the one place
that hands out a finished phase's params: in memory when this process trained them, restored
from the best checkpoint otherwise, and only when a later phase needs them.

Every selection (BC early stopping, each phase's best checkpoint) reads the validation metrics
("eval_*"). The test split is evaluated once, on a phase's best params after the phase has
chosen them (``evaluate_test``); its "test_*" metrics go into the summary row only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import tensorflow as tf
from flax import nnx

from rest_jax.config import TrainConfig
from rest_jax.evaluation import independent_metric_name
from rest_jax.grow import dataset as growdata
from rest_jax.grow import versions
from rest_jax.grow.rewards import StreamedGrowRewards
from rest_jax.grow.adaptive import run_adaptive_grow
from rest_jax.grow.step import run_grow
from rest_jax.improve import batches as hostdata
from rest_jax.improve import losses, selected, selection, value
from rest_jax.improve.extras import Extras, build_extras
from rest_jax.improve.schedules import Threshold
from rest_jax.improve.phase import train_phase
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.parallel import distributed
from rest_jax.pipeline import rescore
from rest_jax.pipeline.build import Run
from rest_jax.pipeline.reporting import summary_row
from rest_jax.pipeline.workdir import phase_name
from rest_jax.tasks import data

logger = logging.getLogger("rest_jax")


class Policies:
  """Finished phases' best params by phase name: kept when trained here, else restored lazily."""

  def __init__(self, run: Run):
    self._run = run
    self._params: dict[str, nnx.State] = {}

  def put(self, phase: str, params: nnx.State) -> None:
    self._params[phase] = params

  def get(self, phase: str) -> nnx.State:
    if phase not in self._params:
      self._params[phase] = self._run.restore_best(phase)
    return self._params[phase]

  def forget_except(self, *keep: str) -> None:
    """Drops params no later phase will ask for (their checkpoints stay on disk)."""
    self._params = {k: v for k, v in self._params.items() if k in keep}


def row(run: Run, *, phase: str, grow_step: int = 0, improve_step: int = 0,
        threshold: float | None = None, train_examples: int, metrics: dict) -> dict:
  """The summary row of a finished phase (the only place rows are built): its validation
  ("eval_*") and, when the test split was evaluated, test ("test_*") metrics."""
  c = run.config
  return summary_row(phase=phase, grow_step=grow_step, improve_step=improve_step,
                     threshold=threshold, train_examples=train_examples,
                     eval_reward=metrics["eval_reward"],
                     eval_exact_match=metrics["eval_exact_match"],
                     eval_independent=metrics.get("eval_independent"),
                     eval_independent_se=metrics.get("eval_independent_se"),
                     independent_metric=independent_metric_name(c.reward,
                                                                c.eval.independent_metric),
                     test={k: v for k, v in metrics.items() if k.startswith("test_")})


def evaluate_test(run: Run, name: str, params: nnx.State) -> dict[str, float]:
  """The test metrics of a finished phase's chosen params ({} when the test split is off).

  Called after the phase has chosen its params; nothing reads the result but the summary row.
  """
  if run.test_fn is None:
    return {}
  metrics = {k: float(v) for k, v in run.test_fn(params).items()}
  logger.info("%s test: %s", name, ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()))
  return metrics


def mark(run: Run, name: str, summary: dict) -> None:
  """Records a finished BC / Improve phase (host 0 writes; every host waits)."""
  if distributed.is_host0():
    run.workdir.mark(name, summary)
  distributed.barrier(f"marked {name}")


def _train(run: Run, name: str, *, params: nnx.State, cfg: TrainConfig, loss: losses.Loss,
           seed: int, lr_scale: float, dataset: tf.data.Dataset | None = None,
           improve_set: selected.Selection | None = None,
           extras: Extras | None = None) -> tuple[nnx.State, dict]:
  """Runs (or resumes) one training phase on ``dataset`` (every host streams the global
  batches) or on ``improve_set`` (each host reads its own rows); returns its best params and
  metrics."""
  trainer = Trainer(run.graphdef, run.layout, loss, make_optimizer(cfg, lr_scale=lr_scale),
                    extras=extras, packing=cfg.packing,
                    packing_scale=cfg.packing_scale)
  c = run.config
  loader = None if improve_set is None else hostdata.ImproveBatches(
      improve_set, batch_size=cfg.batch_size, seed=seed,
      rows=distributed.process_rows(trainer.batch_sharding, cfg.batch_size),
      input_len=c.input_len, target_len=c.target_len)

  def batches(start_step: int):
    if loader is not None:
      return loader.iterate(start_step)
    return hostdata.host_batches(
        data.train_batches(dataset, batch_size=cfg.batch_size, seed=seed,
                           start_step=start_step, input_len=c.input_len,
                           target_len=c.target_len), trainer.batch_sharding)

  def log_fn(step: int, metrics: dict) -> None:
    run.reporter.scalars(name, step, metrics)
    if "eval/eval_reward" in metrics:
      logger.info("%s step %d: %s", name, step,
                  ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()))

  result = train_phase(trainer=trainer, params=params, cfg=cfg, batches=batches,
                       eval_fn=run.eval_fn, checkpoints=run.checkpoints(name),
                       lr_scale=lr_scale, progress=run.progress, log_fn=log_fn,
                       data_state=None if loader is None else loader.state)
  return result.best_params, result.best_metrics


def bc(run: Run, policies: Policies) -> dict:
  """BC on D's train split (every host streams the same global batches and keeps its rows)."""
  c = run.config
  logger.info("BC: training on D (%s, train split)", c.task)
  params, metrics = _train(run, "bc", params=run.base_params, cfg=c.bc, loss=run.parts.bc_loss,
                           dataset=data.task_dataset(run.task, "train"), seed=c.seed,
                           lr_scale=1.0)
  policies.put("bc", params)
  summary = row(run, phase="bc", train_examples=run.task.num_input_examples("train"),
                metrics={**metrics, **evaluate_test(run, "bc", params)})
  mark(run, "bc", summary)
  return summary


def skip_bc(run: Run, policies: Policies) -> dict:
  """``run_bc=False``: the starting checkpoint stands in for BC's result (evaluated, saved)."""
  logger.info("BC skipped (run_bc=False): evaluating the starting checkpoint")
  metrics = {k: float(v) for k, v in run.eval_fn(run.base_params).items()}
  with run.checkpoints("bc") as ckpt:
    ckpt.save_best(0, run.base_params, metrics)
  policies.put("bc", run.base_params)
  summary = row(run, phase="bc", train_examples=0,
                metrics={**metrics, **evaluate_test(run, "bc", run.base_params)})
  mark(run, "bc", summary)
  return summary


def _grow_prompts(run: Run) -> list[dict]:
  """This host's Grow prompts: D's, then those of the unlabeled split (if configured)."""
  c = run.config
  shard = dict(input_len=c.input_len, target_len=c.target_len,
               shard_index=jax.process_index(), num_shards=jax.process_count())
  prompts = data.examples(run.task, "train", **shard)
  if c.grow.unlabeled_split:
    prompts += [dict(p, labeled=False)
                for p in data.examples(run.task, c.grow.unlabeled_split, **shard)]
  return prompts


def grow(run: Run, g: int, params: nnx.State) -> None:
  """Grow step ``g``: samples and scores this host's prompts, then host 0 finalizes."""
  c = run.config
  grow_dir = run.workdir.grow_dir(g)
  prompts = _grow_prompts(run)
  a, n = c.grow.adaptive, c.grow.sampling.num_samples
  kw = dict(sampler=run.parts.grow_sampler, params=run.parts.grow_sampler.place_params(params),
            prompts=prompts, reward=run.reward, vocab=run.vocab,
            writer=growdata.GrowWriter(grow_dir, host_id=jax.process_index()), grow_step=g,
            seed=c.seed, config=c.grow, input_len=c.input_len, target_len=c.target_len,
            progress=run.progress)
  budget = None
  if a.enabled:
    budget = dict(threshold=c.adaptive_threshold, min_passing=a.min_passing,
                  max_samples=a.max_samples, samples_per_round=n)
    logger.info("Grow g%d: %d prompts, rounds of %d samples up to %d, stopping a prompt at %d "
                "samples with reward >= %.3f", g, len(prompts), n, a.max_samples, a.min_passing,
                budget["threshold"])
    run_adaptive_grow(threshold=budget["threshold"], **kw)
  else:
    logger.info("Grow g%d: %d prompts x %d samples", g, len(prompts), n)
    run_grow(**kw)
  distributed.barrier(f"grow g{g} chunks written")
  if not growdata.is_complete(grow_dir):
    growdata.index_chunks(grow_dir, host_id=jax.process_index(), num_hosts=jax.process_count())
  distributed.barrier(f"grow g{g} chunks indexed")
  if jax.process_index() == 0:
    stats = growdata.finalize(grow_dir, adaptive=budget)
    if stats.adaptive:
      b = stats.adaptive
      logger.info("Grow g%d: adaptive sampling drew %d samples (fixed N=%d: %d; %.1f%% saved); "
                  "%d of %d prompts reached %d passing samples", g, b["samples_drawn"],
                  b["max_samples"], b["fixed_samples"], 100 * b["saved_fraction"],
                  b["solved_prompts"], b["prompts"], b["min_passing"])
  distributed.barrier(f"grow g{g} finalized")


@dataclasses.dataclass(frozen=True)
class GrowPlan:
  """A finalized Grow step's statistics and the thresholds of its Improve steps."""

  stats: dict[str, Any]
  thresholds: list[Threshold]


def plan_improve(run: Run, g: int) -> GrowPlan:
  """Reads Grow step ``g``'s stats and plans its Improve steps' thresholds (logs every change)."""
  c = run.config
  grow_dir = run.workdir.grow_dir(g)
  v = c.improve.reward_version
  if v:
    rescore.ensure_version(run.workdir, grow_dir, v, prompts=_grow_prompts(run),
                           host_id=jax.process_index(), num_hosts=jax.process_count(),
                           barrier=distributed.barrier, layout=run.layout)
  stats = dataclasses.asdict(versions.version_stats(grow_dir, v))
  plan, messages = run.parts.schedule.plan(StreamedGrowRewards(grow_dir, v),
                                           num_improve_steps=c.num_improve_steps)
  for message in messages:
    logger.info("grow g%d: %s", g, message)
  logger.info("Grow g%d: %d records, mean sample reward %.4f%s; %s thresholds %s", g,
              stats["count"], stats["mean"], f" (reward version {v})" if v else "",
              c.improve.schedule,
              ", ".join(t.describe() for t in plan))
  return GrowPlan(stats=stats, thresholds=plan)


def _value_dataset(run: Run, g: int) -> tf.data.Dataset:
  """Every record of Grow step ``g`` (originals as in ReST / ReST-EM), in index order."""
  return selection.value_dataset(run.workdir.grow_dir(g),
                                 include_originals=run.config.grow.include_originals,
                                 output_features=run.task.output_features,
                                 reward_version=run.config.improve.reward_version)


def _extras(run: Run, g: int, policies: Policies, *, start_params: nnx.State) -> Extras | None:
  """The Improve loss's pre-pass (None for BC-like losses); trains (or restores) the behaviour
  value network of Grow step ``g`` when the loss needs values."""
  c = run.config
  needs = run.parts.improve_loss.needs
  if not needs:
    return None
  kw: dict[str, Any] = {}
  if losses.NEEDS_BC_LOGPROBS in needs:
    kw["bc_params"] = policies.get("bc")
  if losses.NEEDS_VALUES in needs:
    net = value.ValueNet(c.model, run.layout, seed=c.seed)

    def train():
      init = net.init(policies.get("bc") if c.value.init_from_policy else None)
      value_batches = data.train_batches(_value_dataset(run, g), batch_size=c.value.batch_size,
                                         seed=c.seed + g, input_len=c.input_len,
                                         target_len=c.target_len)
      logger.info("value g%d: %d steps of Monte-Carlo return regression", g, c.value.num_steps)
      params, history = value.train_value(
          net, init, cfg=c.value, batches=value_batches,
          log_fn=lambda step, m: run.reporter.scalars(f"value_g{g:03d}", step, m))
      logger.info("value g%d: loss %.4f -> %.4f", g, history[0], history[-1])
      return params, history

    kw.update(value_net=net, discount=c.value.discount, value_params=value.load_or_train_value(
        net, directory=run.workdir.value_dir(g), train=train))
  return build_extras(needs, layout=run.layout, policy_graphdef=run.graphdef,
                      start_params=start_params, **kw)


def improve(run: Run, policies: Policies, *, g: int, i: int, tau: Threshold,
            start_params: nnx.State, count: int) -> dict:
  """Improve step ``i`` of Grow step ``g`` (the ``count``-th of the run): trains from
  ``start_params`` on the records the selection keeps at threshold ``tau``."""
  c = run.config
  name = phase_name(g, i)
  rules = selected.Rules(
      threshold=tau, include_originals=c.grow.include_originals,
      max_per_prompt=c.improve.max_per_prompt, deduplicate=c.improve.deduplicate,
      drop_all_pass=c.improve.drop_all_pass, drop_all_fail=c.improve.drop_all_fail,
      reward_version=c.improve.reward_version)
  mix = selected.select_to_disk(
      run.workdir.mixed_grow_dirs(g, c.improve.mix_previous_grows),
      run.workdir.selection_dir(name), rules, host_id=jax.process_index(),
      num_hosts=jax.process_count(), barrier=distributed.barrier)
  logger.info("Improve g%d i%d: threshold %s keeps %d examples", g, i, tau.describe(), mix.count)
  if c.improve.drop_all_pass or c.improve.drop_all_fail:
    logger.info("Improve g%d i%d: prompt filters dropped %d all-pass and %d all-fail prompts", g,
                i, mix.dropped_all_pass, mix.dropped_all_fail)
  extras = _extras(run, g, policies, start_params=start_params)
  params, metrics = _train(run, name, params=start_params, cfg=c.improve.train,
                           loss=run.parts.improve_loss, improve_set=mix,
                           seed=c.seed * 1000 + count, lr_scale=c.improve.lr_decay ** count,
                           extras=extras)
  policies.put(name, params)
  summary = row(run, phase="improve", grow_step=g, improve_step=i, threshold=tau.value,
                train_examples=mix.count, metrics={**metrics, **evaluate_test(run, name, params)})
  mark(run, name, summary)
  return summary
