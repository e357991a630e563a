"""The run built once: every name of a RunConfig resolved to a typed object.

Two levels, so that the tools use exactly what a run uses:

* ``resolve(config, devices=...)`` -> ``Parts``: the Layout (``meshes.layout_from_config``, the
  only config -> Layout path), the model definition with abstract (never allocated) params, the
  BC and Improve ``Loss``, the threshold ``Schedule`` and the Grow ``Sampler``. Cheap and
  data-free: ``rest-jax compile-check`` compiles from it for a topology it has not got.
* ``build(config, workdir)`` -> ``Run``: the Parts plus the task, vocabulary, reward, eval
  functions (validation, for every selection; test, reported once per finished phase, or None),
  reporter and starting params of a real run. ``rest-jax best-of-n`` uses
  ``build_eval`` (the same task, reward and samplers) on a finished run.

``validate(config)`` checks every name, the vocabulary size and the task kind against the model
before the workdir is touched; ``run`` records the config only after ``build`` succeeded.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence
import jax
import seqio
from flax import nnx

from rest_jax.checkpoints.phases import PhaseCheckpoints
from rest_jax.config import RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.evaluation import EvalFn, EvalSet, independent_metric_name, make_eval_fn
from rest_jax.grow.memory import device_memory_bytes
from rest_jax.grow.sampler import Sampler
from rest_jax.grow.step import RewardCall
from rest_jax.improve import losses, schedules
from rest_jax.improve import memory as train_memory
from rest_jax.improve.losses import Loss
from rest_jax.improve.schedules import Schedule
from rest_jax.models import build_model
from rest_jax.online import loop as online_loop
from rest_jax.parallel import distributed, meshes
from rest_jax.parallel.layout import Layout
from rest_jax.pipeline.reporting import Reporter
from rest_jax.pipeline.workdir import Workdir
from rest_jax import diversity, rewards, tasks
from rest_jax.tasks import data

logger = logging.getLogger("rest_jax")


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a run, the compile check and best-of-N resolve the same way (no data, no weights)."""

  config: RunConfig
  layout: Layout
  graphdef: nnx.GraphDef
  abstract_params: nnx.State  # ShapeDtypeStructs in nnx.Param, placed on the training rules.
  bc_loss: Loss
  improve_loss: Loss
  schedule: Schedule
  grow_sampler: Sampler


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's Parts plus its data, reward, evaluation, reporting and starting params."""

  parts: Parts
  workdir: Workdir
  task: seqio.Task
  vocab: seqio.Vocabulary
  reward: RewardCall
  eval_fn: EvalFn
  reporter: Reporter
  base_params: nnx.State
  progress: bool
  # The test split's evaluation ("test_*" keys), run once on each finished phase's best params;
  # None when EvalConfig.num_test_examples is 0 or the task has no "test" split.
  test_fn: EvalFn | None = None

  @property
  def config(self) -> RunConfig:
    return self.parts.config

  @property
  def layout(self) -> Layout:
    return self.parts.layout

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self.parts.graphdef

  def checkpoints(self, phase: str) -> PhaseCheckpoints:
    return PhaseCheckpoints(self.workdir.checkpoint_dir(phase))

  def restore_best(self, phase: str) -> nnx.State:
    """The best params of a finished phase, on the training Layout."""
    return restore_best(self.parts, self.workdir, phase)


def restore_best(parts: Parts, workdir: Workdir, phase: str) -> nnx.State:
  """The best params of a finished phase of ``workdir``, on the Layout of ``parts``."""
  with PhaseCheckpoints(workdir.checkpoint_dir(phase)) as ckpt:
    return ckpt.restore_best_params(parts.layout.abstract_state(parts.abstract_params))


def reward_call(fn: rewards.RewardFn, name: str) -> RewardCall:
  """A RewardFn as ``(sources, hypotheses, references) -> [n]`` validated rewards in [0, 1]."""

  def call(sources, hypotheses, references):
    return rewards.score(fn, name, sources, hypotheses, references)

  return call


def make_reward(config: RunConfig, layout: Layout) -> RewardCall:
  """The run's reward (a name, ``learned:``, ``remote:`` or ``py:``), validated per call."""
  return reward_call(rewards.build_reward(config.reward, config.reward_config, layout=layout),
                     rewards.reward_label(config.reward, config.reward_config))


def validate(config: RunConfig) -> None:
  """Fails fast, before the workdir is touched, on an unknown name or an impossible setting.

  Checks the task (name, splits, vocabulary size and kind against the model), the reward, the
  independent metric, the losses and the threshold schedule. Batch sizes (which need the
  devices) and the starting checkpoint's shapes are checked by ``build``, which ``run`` also
  calls before it writes anything.
  """
  task, _ = task_and_vocab(config)
  for split in ("train", "validation", config.grow.unlabeled_split):
    if split and split not in task.splits:
      raise RestJaxError(f"task {config.task!r} has no split {split!r} (it has "
                         f"{sorted(task.splits)}); fix the task or GrowConfig.unlabeled_split.")
  rewards.check_reward_spec(config.reward)
  metric = independent_metric_name(config.reward, config.eval.independent_metric)
  if metric:
    rewards.get_reward(metric)
  _losses(config)
  schedules.from_config(config.improve)
  if config.grow.adaptive.enabled:
    config.adaptive_threshold  # pylint: disable=pointless-statement (raises when unknowable)


def _losses(config: RunConfig) -> tuple[Loss, Loss]:
  bc, improve = losses.make_loss(config.bc), losses.make_loss(config.improve.train)
  if bc.needs:
    raise RestJaxError(f"loss {config.bc.loss!r} needs {sorted(bc.needs)}"
                       ", which exist only in Improve steps; train BC with 'bc' (bc/TrainConfig."
                       "loss) and select it for Improve (improve/TrainConfig.loss).")
  return bc, improve


def resolve(config: RunConfig, *, devices: Sequence[Any] | None = None,
            granule: Callable[[Any], int] | None = None) -> Parts:
  """The Layout, model, losses, schedule and Grow sampler of ``config`` on ``devices``.

  ``devices`` default to every device of the job; ``granule`` maps a device to the slice or
  node that the DCN mesh sizes split across (default: TPU slice, else process).
  """
  layout = meshes.layout_from_config(config.mesh, devices, key=granule or meshes.granule_key)
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
  if config.algorithm != "rest":  # Before BC: an impossible online config fails now.
    online_loop.check(config, layout.num_batch_shards)
  bc_loss, improve_loss = _losses(config)
  abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract)
  return Parts(config=config, layout=layout, graphdef=graphdef, abstract_params=abstract_params,
               bc_loss=bc_loss, improve_loss=improve_loss,
               schedule=schedules.from_config(config.improve),
               grow_sampler=Sampler.from_config(graphdef, layout, config.grow.sampling))


def _base_params(parts: Parts, vocab: seqio.Vocabulary) -> nnx.State:
  """The starting params: ``init_checkpoint`` (token rows reordered for HF) or a seeded init."""
  config = parts.config
  if not config.init_checkpoint:
    def init():
      return nnx.split(build_model(config.model, rngs=nnx.Rngs(config.seed)))[1]
    return jax.jit(init, out_shardings=parts.layout.state_shardings(parts.abstract_params))()
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  logger.info("starting from checkpoint %s", config.init_checkpoint)
  _, params = convert.load_checkpoint(config.init_checkpoint, config=config.model,
                                      layout=parts.layout)
  if hasattr(vocab, "model_to_hf") and convert.checkpoint_format(config.init_checkpoint) == "hf":
    # The checkpoint's token rows are in the tokenizer's order; ours puts PAD at 0, EOS at 1.
    params = convert.reorder_vocab(config.model, params, vocab.model_to_hf)
  return params


def task_kind(task: seqio.Task) -> str:
  """"encdec" when the task's prompts end with EOS (encoder-decoder tasks), else "decoder"."""
  return "encdec" if task.output_features["inputs"].add_eos else "decoder"


def _vocab_fix(config: RunConfig) -> str:
  if config.init_checkpoint:
    return ("use the checkpoint's tokenizer: pass the model.gin that `rest-jax import` wrote "
            "after the experiment's gin files, or set FileTaskConfig.vocabulary = "
            "'hf:CHECKPOINT_DIR/tokenizer.json' (spm:PATH for SentencePiece models)")
  return "raise the model's vocab_size (e.g. --gin.models.get_preset.vocab_size=N)"


def task_and_vocab(config: RunConfig) -> tuple[seqio.Task, seqio.Vocabulary]:
  """The prompt task and its target vocabulary, checked against the model.

  Raises:
    RestJaxError: an unknown task, a vocabulary larger than the model's vocab_size, or a task
      kind ("encdec" / "decoder") other than the model's.
  """
  task = tasks.get_task(config.task)
  vocab = task.output_features["targets"].vocabulary
  model = config.model
  if vocab.vocab_size > model.vocab_size:
    raise RestJaxError(f"task {config.task!r} has a vocabulary of {vocab.vocab_size} tokens but "
                       f"the model has vocab_size={model.vocab_size}; {_vocab_fix(config)}.")
  kind = task_kind(task)
  if kind != model.kind:
    family = "a decoder-only" if model.kind == "decoder" else "an encoder-decoder"
    raise RestJaxError(
        f"task {config.task!r} is of kind {kind!r} but the model is {family} model "
        f"(kind {model.kind!r}); give the task kind {model.kind!r} (FileTaskConfig.kind / "
        f"TfdsTaskConfig.kind, e.g. --gin.config.FileTaskConfig.kind=\"'{model.kind}'\") or "
        f"use a model of kind {kind!r}.")
  return task, vocab


def eval_set(config: RunConfig, task: seqio.Task, num_examples: int = 0,
             split: str = "validation") -> EvalSet:
  """The first ``num_examples`` (default ``EvalConfig.num_examples``) prompts of ``split``."""
  examples = data.examples(task, split, input_len=config.input_len,
                           target_len=config.target_len)
  return EvalSet.from_examples(examples[:num_examples or config.eval.num_examples],
                               input_len=config.input_len)


def num_test_prompts(config: RunConfig, task: seqio.Task) -> int:
  """Test prompts to evaluate per finished phase; 0 (with a logged note why) for none."""
  if not config.eval.test_size:
    logger.info("test evaluation off (EvalConfig.num_test_examples = 0): rows report the "
                "validation split only, which selections also use.")
    return 0
  if tasks.TEST_SPLIT not in task.splits:
    logger.info("task %r has no %r split: rows report the validation split only, which "
                "selections also use (give the task a test split, e.g. FileTaskConfig.test).",
                task.name, tasks.TEST_SPLIT)
    return 0
  return config.eval.test_size


def check_memory(parts: Parts, available: int | None) -> None:
  """Refuses a run whose Grow or train steps cannot fit ``available`` bytes per device (None:
  the devices do not say, e.g. CPU: no check). Grow: the sampler's memory plan (one prompt per
  batch shard at least); BC and Improve: the training floor (``improve.memory``)."""
  if available is None:
    return
  config = parts.config
  parts.grow_sampler.memory_plan(parts.abstract_params, config.input_len,
                                 config.grow.sampling.batch_size, available=available)
  params = parts.layout.abstract_state(parts.abstract_params)
  for step, train in (("bc", config.bc), ("improve", config.improve.train)):
    floor = train_memory.train_floor(
        config.model, parts.layout, params, moment_dtype=train.moment_dtype,
        batch_size=train.batch_size, input_len=config.input_len, target_len=config.target_len)
    train_memory.check_train_fits(floor, available, step=step, model=config.model,
                                  layout=parts.layout, batch_size=train.batch_size)


def test_eval_fn(parts: Parts, test_set: EvalSet, evaluation: dict) -> EvalFn:
  """The test split's ``"test_*"`` metrics: greedy (``make_eval_fn``) and, with
  ``EvalConfig.num_test_samples`` > 0, pass@k and distinct-n of sampled answers."""
  config = parts.config
  greedy = make_eval_fn(eval_set=test_set, prefix="test", **evaluation)
  n = config.eval.num_test_samples
  if not n:
    return greedy
  s = config.grow.sampling
  sampler = Sampler(parts.graphdef, parts.layout, num_samples=n,
                    max_decode_len=config.eval.max_decode_len, temperature=s.temperature,
                    top_k=s.top_k, top_p=s.top_p, batch_size=config.eval.batch_size)
  sampled = diversity.make_sample_eval_fn(
      sampler=sampler, eval_set=test_set, reward=evaluation["reward"], vocab=evaluation["vocab"],
      batch_size=config.eval.batch_size, seed=config.seed,
      pass_threshold=config.eval.pass_threshold)
  return lambda params: {**greedy(params), **sampled(params)}


def build(config: RunConfig, workdir: Workdir, *, progress: bool = True) -> Run:
  """Everything a run needs, built once (params initialised or loaded, on the Layout)."""
  parts = resolve(config)
  check_memory(parts, device_memory_bytes(list(parts.layout.mesh.devices.flat)))
  task, vocab = task_and_vocab(config)
  reward = make_reward(config, parts.layout)
  base_params = _base_params(parts, vocab)
  eval_sampler = Sampler(parts.graphdef, parts.layout, num_samples=1,
                         max_decode_len=config.eval.max_decode_len,
                         batch_size=config.eval.batch_size)
  metric = independent_metric_name(config.reward, config.eval.independent_metric)
  evaluation = dict(sampler=eval_sampler, reward=reward, vocab=vocab,
                    batch_size=config.eval.batch_size,
                    independent=metric and reward_call(rewards.get_reward(metric), metric))
  eval_fn = make_eval_fn(eval_set=eval_set(config, task), **evaluation)
  num_test = num_test_prompts(config, task)
  test_fn = num_test and test_eval_fn(parts, eval_set(config, task, num_test,
                                                      split=tasks.TEST_SPLIT), evaluation)
  reporter = Reporter(workdir, enabled=jax.process_index() == 0,
                      monitor_tolerance=config.eval.monitor_tolerance)
  return Run(parts=parts, workdir=workdir, task=task, vocab=vocab, reward=reward,
             eval_fn=eval_fn, reporter=reporter, base_params=base_params, progress=progress,
             test_fn=test_fn or None)
