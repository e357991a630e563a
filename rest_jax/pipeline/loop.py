"""The ReST state machine: BC -> (Grow -> Improve x I) x G, resumable from the workdir.

Orchestration only: every number is computed by the modules it calls. Workdir layout:

  config.gin            the operative gin config (text, for people)
  run_config.json       the RunConfig it produced (compared on resume)
  state.json            current phase and accumulated wall time
  phases/{name}.json    completion marker + summary row of a finished BC / Improve phase
  grow/g{g:03d}/        the Grow dataset of step g (chunks, stats.json, COMPLETED)
  checkpoints/{name}/   orbax checkpoints of a training phase (latest for resume, best)
  tb/, summary.json, report/*.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
from flax import nnx

from rest_jax import rewards

from rest_jax.tasks import data

from rest_jax.parallel import distributed

from rest_jax.grow import dataset as growdata

from rest_jax.improve import batches as hostdata

from rest_jax.improve import losses

from rest_jax.parallel import meshes

from rest_jax.improve import selection as mixture
from rest_jax import tasks
from rest_jax.improve import schedules
from rest_jax.improve import value
from rest_jax.checkpoints.phases import PhaseCheckpoints
from rest_jax.config import RunConfig, TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.evaluation import EvalSet, independent_metric_name, make_eval_fn
from rest_jax.improve.extras import build_extras
from rest_jax.grow.step import run_grow
from rest_jax.improve.trainer import Trainer, make_optimizer, train_phase
from rest_jax.models import build_model
from rest_jax.pipeline.reporting import Reporter, format_table, read_json, summary_row, write_json_atomic
from rest_jax.grow.sampler import Sampler, place_params
from rest_jax.parallel.layout import Layout

logger = logging.getLogger("rest_jax")


def phase_name(grow_step: int, improve_step: int) -> str:
  return "bc" if grow_step == 0 else f"g{grow_step:03d}_i{improve_step:02d}"


def check_workdir(workdir: str, config: RunConfig, config_text: str) -> None:
  """Refuses a workdir made by another config; records this config in a new one."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "run_config.json")
  mine = json.loads(json.dumps(dataclasses.asdict(config)))
  exists = os.path.exists(path)
  distributed.barrier("workdir checked")  # Every host looks before host 0 writes.
  if exists:
    theirs = read_json(path)
    # A field added by a newer rest_jax is missing from older workdirs: it reads as its default.
    diffs = _diff(theirs, mine, json.loads(json.dumps(dataclasses.asdict(RunConfig()))))
    if diffs:
      raise RestJaxError(
          f"workdir {workdir} was made by a different config ({'; '.join(diffs[:5])}). "
          "Rerun with the gin files and overrides of that run (see its config.gin) to resume, "
          "or choose a new --workdir.")
    return
  if distributed.is_host0():
    write_json_atomic(path, mine)
    with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(config_text)
  distributed.barrier("workdir recorded")


def _diff(a: Any, b: Any, default: Any = None, prefix: str = "") -> list[str]:
  """Differences between recorded config ``a`` and ``b``; keys missing in ``a`` read as ``default``."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    default = default if isinstance(default, dict) else {}
    for key in sorted(set(a) | set(b)):
      theirs = a[key] if key in a else default.get(key)
      out += _diff(theirs, b.get(key), default.get(key), f"{prefix}{key}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} in the workdir, {b!r} now"]


@dataclasses.dataclass
class _Run:
  """Everything built once per invocation."""

  config: RunConfig
  workdir: str
  layout: Layout
  graphdef: Any
  base_params: Any
  task: Any
  vocab: Any
  reward: Any
  grow_sampler: Sampler
  eval_fn: Any
  reporter: Reporter
  progress: bool


def _reward_call(fn, name):
  def call(sources, hypotheses, references):
    return rewards.score(fn, name, sources, hypotheses, references)
  return call


def _build(config: RunConfig, workdir: str, progress: bool) -> _Run:
  layout = meshes.layout_from_config(config.mesh)
  s = config.grow.sampling
  distributed.check_batch_sizes(  # Before BC: a bad size must not surface mid-run.
      {"bc TrainConfig.batch_size": config.bc.batch_size,
       "ImproveConfig.train.batch_size": config.improve.train.batch_size},
      num_batch_shards=layout.num_batch_shards)
  distributed.check_batch_sizes({"GrowConfig.sampling.batch_size": s.batch_size},
                                num_batch_shards=1)
  distributed.check_batch_sizes(
      {"GrowConfig.sampling.batch_size x num_samples": s.batch_size * s.num_samples,
       "EvalConfig.batch_size": config.eval.batch_size},
      num_batch_shards=layout.num_batch_shards, processes=False)
  task = tasks.get_task(config.task)
  reward = _reward_call(rewards.build_reward(config.reward, config.reward_config, layout=layout),
                        rewards.reward_label(config.reward, config.reward_config))
  vocab = task.output_features["targets"].vocabulary
  if vocab.vocab_size > config.model.vocab_size:
    raise RestJaxError(f"task {config.task!r} has a vocabulary of {vocab.vocab_size} tokens but the "
                       f"model has vocab_size={config.model.vocab_size}; raise the model's "
                       "vocab_size.")
  abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = layout.state_shardings(abstract_state)

  def init():
    return nnx.split(build_model(config.model, rngs=nnx.Rngs(config.seed)))[1]

  if config.init_checkpoint:
    from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
    logger.info("starting from checkpoint %s", config.init_checkpoint)
    _, base_params = convert.load_checkpoint(config.init_checkpoint, config=config.model,
                                             layout=layout)
    if hasattr(vocab, "model_to_hf") and convert.checkpoint_format(config.init_checkpoint) == "hf":
      # The checkpoint's token rows are in the tokenizer's order; ours puts PAD at 0, EOS at 1.
      base_params = convert.reorder_vocab(config.model, base_params, vocab.model_to_hf)
  else:
    base_params = jax.jit(init, out_shardings=shardings)()
  grow_sampler = Sampler.from_config(graphdef, layout, config.grow.sampling)
  eval_sampler = Sampler(graphdef, layout, num_samples=1,
                         max_decode_len=config.eval.max_decode_len,
                         batch_size=config.eval.batch_size)
  eval_examples = data.examples(task, "validation", input_len=config.input_len,
                                target_len=config.target_len)[:config.eval.num_examples]
  eval_set = EvalSet.from_examples(eval_examples, input_len=config.input_len)
  metric = independent_metric_name(config.reward, config.eval.independent_metric)
  eval_fn = make_eval_fn(sampler=eval_sampler, eval_set=eval_set, reward=reward, vocab=vocab,
                         batch_size=config.eval.batch_size,
                         independent=metric and _reward_call(rewards.get_reward(metric), metric))
  reporter = Reporter(workdir, enabled=jax.process_index() == 0)
  return _Run(config, workdir, layout, graphdef, base_params, task, vocab, reward, grow_sampler,
              eval_fn, reporter, progress)


def validate_names(config: RunConfig) -> None:
  """Fails fast, before the workdir is touched, on unknown task / reward / loss names."""
  task = tasks.get_task(config.task)
  for split in ("train", "validation", config.grow.unlabeled_split):
    if split and split not in task.splits:
      raise RestJaxError(f"task {config.task!r} has no split {split!r} (it has "
                         f"{sorted(task.splits)}); fix the task or GrowConfig.unlabeled_split.")
  rewards.check_reward_spec(config.reward)
  metric = independent_metric_name(config.reward, config.eval.independent_metric)
  if metric:
    rewards.get_reward(metric)
  schedules.from_config(config.improve)  # Unknown schedule names and bad parameters.
  losses.check_loss_name(config.bc.loss)
  losses.check_loss_name(config.improve.train.loss)
  bc_needs = losses.make_loss(config.bc).needs
  if bc_needs:
    raise RestJaxError(f"loss {config.bc.loss!r} needs {sorted(bc_needs)}"
                       ", which exist only in Improve steps; train BC with 'bc' (bc/TrainConfig."
                       "loss) and select it for Improve (improve/TrainConfig.loss).")


def _train(run: _Run, name: str, *, params: Any, cfg: TrainConfig, dataset: Any, seed: int,
           lr_scale: float, extras: Any = None) -> tuple[Any, dict]:
  """Runs (or resumes) one training phase and returns its best params and metrics."""
  trainer = Trainer(run.graphdef, run.layout, losses.make_loss(cfg),
                    make_optimizer(cfg, lr_scale=lr_scale), extras=extras)
  c = run.config

  def batches(start_step: int):
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
                       eval_fn=run.eval_fn,
                       checkpoints=PhaseCheckpoints(os.path.join(run.workdir, "checkpoints", name)),
                       lr_scale=lr_scale, progress=run.progress, log_fn=log_fn)
  return result.best_params, result.best_metrics


def _extras(run: _Run, grow_dir: str, g: int, *, start_params: Any, bc_params: Any) -> Any:
  """The pre-pass of the Improve loss (None for BC-like losses); trains (or restores) the
  behaviour value network of Grow step ``g`` when the loss needs values."""
  c = run.config
  needs = losses.make_loss(c.improve.train).needs
  if not needs:
    return None
  kw = {}
  if losses.NEEDS_BC_LOGPROBS in needs:
    kw["bc_params"] = bc_params if bc_params is not None else _restore_best(run, "bc")
  if losses.NEEDS_VALUES in needs:
    net = value.ValueNet(c.model, run.layout, seed=c.seed)

    def train():
      policy = None
      if c.value.init_from_policy:
        policy = bc_params if bc_params is not None else _restore_best(run, "bc")
      dataset = mixture.value_dataset(grow_dir, include_originals=c.grow.include_originals,
                                      output_features=run.task.output_features)
      batches = data.train_batches(dataset, batch_size=c.value.batch_size, seed=c.seed + g,
                                   input_len=c.input_len, target_len=c.target_len)
      logger.info("value g%d: %d steps of Monte-Carlo return regression", g, c.value.num_steps)
      init = net.init(policy)
      params, history = value.train_value(
          net, init, cfg=c.value, batches=batches,
          log_fn=lambda step, m: run.reporter.scalars(f"value_g{g:03d}", step, m))
      logger.info("value g%d: loss %.4f -> %.4f", g, history[0], history[-1])
      return params, history

    kw.update(value_net=net, discount=c.value.discount, value_params=value.load_or_train_value(
        net, directory=value.value_dir(run.workdir, g), train=train))
  return build_extras(needs, layout=run.layout, policy_graphdef=run.graphdef,
                      start_params=start_params, **kw)


def _barrier(name: str) -> None:
  """Waits for every host (a no-op in a single-process run); RestJaxError on a timeout."""
  distributed.barrier(name)


def _grow_prompts(run: _Run) -> list[dict]:
  """This host's Grow prompts: D's, then those of the unlabeled split (if configured)."""
  c = run.config
  shard = dict(input_len=c.input_len, target_len=c.target_len,
               shard_index=jax.process_index(), num_shards=jax.process_count())
  prompts = data.examples(run.task, "train", **shard)
  if c.grow.unlabeled_split:
    prompts += [dict(p, labeled=False)
                for p in data.examples(run.task, c.grow.unlabeled_split, **shard)]
  return prompts


def _restore_best(run: _Run, name: str) -> Any:
  ckpt = PhaseCheckpoints(os.path.join(run.workdir, "checkpoints", name))
  return ckpt.restore_best_params(run.layout.abstract_state(run.base_params))


def _skip_bc(run: _Run) -> dict:
  """``run_bc=False``: the starting checkpoint stands in for BC's result (evaluated, saved)."""
  logger.info("BC skipped (run_bc=False): evaluating the starting checkpoint")
  metrics = {k: float(v) for k, v in run.eval_fn(run.base_params).items()}
  with PhaseCheckpoints(os.path.join(run.workdir, "checkpoints", "bc")) as ckpt:
    ckpt.save_best(0, run.base_params, metrics)
  row = summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None, train_examples=0,
                    eval_reward=metrics["eval_reward"],
                    eval_exact_match=metrics["eval_exact_match"])
  _mark(run, "bc", row)
  return row


def _mark(run: _Run, name: str, row: dict) -> None:
  path = os.path.join(run.workdir, "phases", f"{name}.json")
  if distributed.is_host0():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, row)
  _barrier(f"marked {name}")


def _marked(run: _Run, name: str) -> dict | None:
  path = os.path.join(run.workdir, "phases", f"{name}.json")
  return read_json(path) if os.path.exists(path) else None


def run(config: RunConfig, workdir: str, *, config_text: str = "", progress: bool = True) -> dict:
  """Runs (or resumes) a whole ReST experiment in ``workdir``; returns the summary dict."""
  start = time.time()
  workdir = os.path.abspath(workdir)
  validate_names(config)
  check_workdir(workdir, config, config_text)
  state_path = os.path.join(workdir, "state.json")
  previous_wall = read_json(state_path)["wall_time_s"] if os.path.exists(state_path) else 0.0

  def save_state(phase: str) -> None:
    if jax.process_index() == 0:
      write_json_atomic(state_path, {"phase": phase,
                                     "wall_time_s": previous_wall + time.time() - start})

  run_ = _build(config, workdir, progress)
  rows: list[dict] = []
  grow_stats: dict[int, dict] = {}
  taus_by_step: dict[int, list[float]] = {}

  # BC on D.
  row = _marked(run_, "bc")
  params = None  # Loaded lazily: a finished phase only matters if a later one must run.
  last_done = "bc"
  if row is None and not config.run_bc:
    row = _skip_bc(run_)
    params = run_.base_params
  if row is None:
    save_state("bc")
    logger.info("BC: training on D (%s, train split)", config.task)
    # Every host streams the same global batches and keeps its rows (hostdata.host_batches).
    dataset = data.task_dataset(run_.task, "train")
    params, metrics = _train(run_, "bc", params=run_.base_params, cfg=config.bc, dataset=dataset,
                             seed=config.seed, lr_scale=1.0)
    row = summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None,
                      train_examples=run_.task.num_input_examples("train"),
                      eval_reward=metrics["eval_reward"],
                      eval_exact_match=metrics["eval_exact_match"],
                      eval_independent=metrics.get("eval_independent"),
                      independent_metric=independent_metric_name(
                          config.reward, config.eval.independent_metric))
    _mark(run_, "bc", row)
  rows.append(row)
  logger.info("BC eval reward %.4f, exact match %.3f", row["eval_reward"], row["eval_exact_match"])
  bc_params = params

  improve_count = 0
  for g in range(1, config.num_grow_steps + 1):
    grow_dir = os.path.join(workdir, "grow", f"g{g:03d}")
    if not growdata.is_complete(grow_dir):
      save_state(f"grow g{g}")
      if params is None:
        params = _restore_best(run_, last_done)
      prompts = _grow_prompts(run_)
      logger.info("Grow g%d: %d prompts x %d samples", g, len(prompts),
                  config.grow.sampling.num_samples)
      run_grow(sampler=run_.grow_sampler,
               params=place_params(params, run_.layout, sampling=True), prompts=prompts,
               reward=run_.reward, vocab=run_.vocab,
               writer=growdata.GrowWriter(grow_dir, host_id=jax.process_index()), grow_step=g,
               seed=config.seed, config=config.grow, input_len=config.input_len,
               target_len=config.target_len, progress=progress)
      _barrier(f"grow g{g} chunks written")
      if jax.process_index() == 0:
        growdata.finalize(grow_dir)
      _barrier(f"grow g{g} finalized")
    stats = growdata.read_stats(grow_dir)
    grow_stats[g] = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
    plan, messages = schedules.from_config(config.improve).plan(
        schedules.GrowRewards.from_index(growdata.load_index(grow_dir)),
        num_improve_steps=config.num_improve_steps)
    for message in messages:
      logger.info("grow g%d: %s", g, message)
    taus_by_step[g] = [t.value for t in plan]
    logger.info("Grow g%d: %d records, mean sample reward %.4f; %s thresholds %s", g,
                grow_stats[g]["count"], grow_stats[g]["mean"], config.improve.schedule,
                ", ".join(t.describe() for t in plan))
    for i in range(1, config.num_improve_steps + 1):
      name = phase_name(g, i)
      improve_count += 1
      row = _marked(run_, name)
      if row is None:
        save_state(f"improve g{g} i{i}")
        tau = plan[i - 1]
        restart = config.improve.restart_from_base and i == 1
        if restart:
          start_params = bc_params if bc_params is not None else _restore_best(run_, "bc")
        else:
          start_params = params if params is not None else _restore_best(run_, last_done)
        mix = mixture.select_mixture(
            mixture.previous_grow_dirs(workdir, g, config.improve.mix_previous_grows),
            threshold=tau, include_originals=config.grow.include_originals,
            max_per_prompt=config.improve.max_per_prompt,
            deduplicate=config.improve.deduplicate)
        num_selected = mix.count
        dataset = hostdata.canonical_order(
            mixture.improve_dataset(mix, output_features=run_.task.output_features))
        logger.info("Improve g%d i%d: threshold %s keeps %d examples", g, i, tau.describe(),
                    num_selected)
        extras = _extras(run_, grow_dir, g, start_params=start_params, bc_params=bc_params)
        params, metrics = _train(run_, name, params=start_params, cfg=config.improve.train,
                                 dataset=dataset, seed=config.seed * 1000 + improve_count,
                                 lr_scale=config.improve.lr_decay ** improve_count,
                                 extras=extras)
        row = summary_row(phase="improve", grow_step=g, improve_step=i, threshold=tau.value,
                          train_examples=num_selected, eval_reward=metrics["eval_reward"],
                          eval_exact_match=metrics["eval_exact_match"],
                          eval_independent=metrics.get("eval_independent"),
                          independent_metric=independent_metric_name(
                          config.reward, config.eval.independent_metric))
        _mark(run_, name, row)
      else:
        params = None  # Finished earlier: restored from its best checkpoint when needed.
      last_done = name
      rows.append(row)
      logger.info("Improve g%d i%d: eval reward %.4f, exact match %.3f", g, i,
                  row["eval_reward"], row["eval_exact_match"])

  save_state("done")
  _barrier("done")
  wall = read_json(state_path)["wall_time_s"] if os.path.exists(state_path) else 0.0
  run_.reporter.write_summary(rows, wall)
  run_.reporter.write_plots(rows, grow_stats, taus_by_step)
  run_.reporter.close()
  logger.info("summary (%s):\n%s", os.path.join(workdir, "summary.json"), format_table(rows))
  return {"rows": rows, "wall_time_s": wall}
