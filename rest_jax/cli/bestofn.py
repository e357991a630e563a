"""Best-of-N at evaluation: sample N per held-out prompt, keep the highest-reward sample.

ReST's Figure 6: best-of-N stacks with ReST (ReST with N < 10 matches BC with N = 200). For a
saved policy, ``sample_rewards`` draws ``max(ns)`` samples per D_eval prompt once and scores
each; ``best_of_n`` then takes, for every N, the best of the FIRST N samples of each prompt, so
the numbers are nested: the N = 1 value is the mean reward of sample 0, and the curve never
decreases in N. ``run_best_of_n`` does this for a phase of a workdir (read only: nothing is
written there) and backs ``rest-jax best-of-n``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.errors import RestJaxError

# The sampling stream of best-of-N (folded in where Grow folds its grow step): no Grow step
# uses it, so best-of-N samples are independent of every Grow set.
BEST_OF_N_STREAM = 999_999


def parse_ns(text: str | Sequence[int]) -> list[int]:
  """"1,2,4" (or a sequence) -> sorted distinct positive ints; RestJaxError otherwise."""
  try:
    ns = [int(n) for n in (text.split(",") if isinstance(text, str) else text) if str(n).strip()]
  except ValueError:
    ns = []
  if not ns or min(ns) < 1:
    raise RestJaxError(f"best-of-N sizes {text!r} must be positive integers, e.g. --n 1,2,4,8,16.")
  return sorted(set(ns))


def best_of_n(rewards: np.ndarray, ns: Sequence[int]) -> dict[int, float]:
  """Mean over prompts of the best reward among each prompt's first N samples, for each N.

  Args:
    rewards: float `[num_prompts, max_n]`, column n = reward of sample n.
    ns: the N values, each in [1, max_n].
  Returns:
    N -> mean best-of-N reward (non-decreasing in N; N = 1 is the mean of column 0).
  """
  rewards = np.asarray(rewards, dtype=np.float64)
  if rewards.ndim != 2 or rewards.size == 0:
    raise RestJaxError(f"best_of_n needs rewards [num_prompts, max_n], got {rewards.shape}.")
  out = {}
  for n in parse_ns(list(ns)):
    if n > rewards.shape[1]:
      raise RestJaxError(f"N = {n} exceeds the {rewards.shape[1]} samples drawn per prompt; "
                         "sample max(N) per prompt.")
    out[n] = float(rewards[:, :n].max(axis=1).mean())
  return out


def sample_rewards(*, sampler: Any, params: Any, inputs: np.ndarray, sources: Sequence[str],
                   references: Sequence[str], reward: Callable[..., np.ndarray], vocab: Any,
                   seed: int, batch_size: int) -> np.ndarray:
  """Rewards of ``sampler.num_samples`` samples per prompt.

  Args:
    sampler: a ``Sampler`` with ``num_samples = max N``.
    params: the policy's params state.
    inputs: int32 `[num_prompts, input_len]`; prompt b has example id b.
    sources, references: `[num_prompts]` texts for the reward.
    reward: ``(sources, hypotheses, references) -> [n]`` validated rewards.
    vocab: the target vocabulary.
    seed: sampling seed (with ``BEST_OF_N_STREAM``, the prompt index and the sample index).
    batch_size: prompts per sampler call.
  Returns:
    float32 `[num_prompts, num_samples]`.
  """
  from rest_jax.evaluation import detokenize  # pylint: disable=g-import-not-at-top

  n = sampler.num_samples
  params = sampler.place_params(params)
  rows = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    out = sampler.generate(params, chunk, np.arange(start, start + len(chunk), dtype=np.int64),
                           seed=seed, grow_step=BEST_OF_N_STREAM)
    hyps = detokenize(vocab, out.tokens, out.lengths)
    idx = np.repeat(np.arange(start, start + len(chunk)), n)
    rows.append(np.asarray(reward([sources[i] for i in idx], hyps,
                                  [references[i] for i in idx]), np.float32).reshape(-1, n))
  return np.concatenate(rows, axis=0)


def _build(cls: type, values: dict) -> Any:
  """A (nested) frozen config dataclass from its ``dataclasses.asdict`` JSON; fields missing
  from ``values`` (added after the run) take their defaults, unknown ones are ignored."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value, kind = values[field.name], hints[field.name]
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
      value = _build(kind, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(**kwargs)


def load_run_config(workdir: str) -> Any:
  """The RunConfig a workdir was made with (from its run_config.json)."""
  from rest_jax.config import RunConfig  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "run_config.json")
  if not os.path.exists(path):
    raise RestJaxError(f"{path} does not exist; pass the --workdir of a `rest-jax run`.")
  with open(path, encoding="utf-8") as f:
    return _build(RunConfig, json.load(f))


def resolve_phase(workdir: str, phase: str) -> str:
  """"bc", "final" (the last finished phase) or "g2_i2" / "g002_i02" -> the checkpoint name."""
  done = sorted(name[:-5] for name in os.listdir(os.path.join(workdir, "phases"))
                if name.endswith(".json")) if os.path.isdir(os.path.join(workdir, "phases")) else []
  if phase == "final":
    improve = [p for p in done if p != "bc"]
    name = improve[-1] if improve else ("bc" if "bc" in done else "")
  else:
    match = re.fullmatch(r"g0*(\d+)_i0*(\d+)", phase)
    name = "bc" if phase == "bc" else (f"g{int(match[1]):03d}_i{int(match[2]):02d}"
                                       if match else "")
  if not name or name not in done:
    raise RestJaxError(f"phase {phase!r} has no finished checkpoint in {workdir} (finished: "
                       f"{done or 'none'}); pass bc, final, or gG_iI of a finished phase.")
  return name


def load_phase_params(workdir: str, phase: str, layout: Any) -> tuple[str, Any, Any]:
  """(checkpoint name, graphdef, best params) of a finished phase of a workdir, on ``layout``.

  ``phase``: "bc", "final" or "gG_iI" (see ``resolve_phase``). Reads only.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from rest_jax.checkpoints.phases import PhaseCheckpoints  # pylint: disable=g-import-not-at-top
  from rest_jax.models import build_model  # pylint: disable=g-import-not-at-top

  c = load_run_config(workdir)
  name = resolve_phase(workdir, phase)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(c.model,
                                                                    rngs=nnx.Rngs(c.seed))))
  ckpt_dir = os.path.join(workdir, "checkpoints", name)
  if not os.path.isdir(os.path.join(ckpt_dir, "best")):
    raise RestJaxError(f"{ckpt_dir}/best does not exist; phase {name} saved no checkpoint.")
  with PhaseCheckpoints(ckpt_dir) as ckpt:
    return name, graphdef, ckpt.restore_best_params(layout.abstract_state(abstract))


def run_best_of_n(workdir: str, *, phase: str, ns: Sequence[int], num_examples: int = 0,
                  temperature: float | None = None, seed: int | None = None,
                  batch_size: int = 0) -> dict:
  """Best-of-N of a saved policy on the workdir's D_eval, scored by its training reward.

  Samples with the run's Grow sampling settings (temperature overridable). Reads the workdir
  and its checkpoints; writes nothing there.

  Returns:
    {"phase", "n": {N: mean best reward}, "mean_sample_reward", "num_examples",
     "temperature", "reward"}.
  """
  from rest_jax import rewards, tasks  # pylint: disable=g-import-not-at-top
  from rest_jax.tasks import data  # pylint: disable=g-import-not-at-top
  from rest_jax.evaluation import EvalSet  # pylint: disable=g-import-not-at-top
  from rest_jax.grow.sampler import Sampler  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel.meshes import layout_from_config  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  ns = parse_ns(list(ns))
  c = load_run_config(workdir)
  layout = layout_from_config(c.mesh)  # The run's own Layout: sizes, DCN and rule set.
  name, graphdef, params = load_phase_params(workdir, phase, layout)
  task = tasks.get_task(c.task)
  examples = data.examples(task, "validation", input_len=c.input_len, target_len=c.target_len)
  examples = examples[:num_examples or c.eval.num_examples]
  eval_set = EvalSet.from_examples(examples, input_len=c.input_len)
  sampling = c.grow.sampling
  temp = sampling.temperature if temperature is None else float(temperature)
  batch = batch_size or c.eval.batch_size
  sampler = Sampler(graphdef, layout, num_samples=max(ns), max_decode_len=sampling.max_decode_len,
                    temperature=temp, top_k=sampling.top_k, top_p=sampling.top_p,
                    batch_size=batch)
  fn = rewards.get_reward(c.reward)
  scores = sample_rewards(
      sampler=sampler, params=params, inputs=eval_set.inputs, sources=eval_set.sources,
      references=eval_set.references, vocab=task.output_features["targets"].vocabulary,
      reward=lambda s, h, r: rewards.score(fn, c.reward, s, h, r),
      seed=c.seed if seed is None else seed, batch_size=batch)
  return {"phase": name, "n": best_of_n(scores, ns), "mean_sample_reward": float(scores.mean()),
          "num_examples": len(examples), "temperature": temp, "reward": c.reward}


def format_best_of_n(results: Sequence[dict]) -> str:
  """A text table: one row per phase, one column per N."""
  ns = sorted({n for r in results for n in r["n"]})
  head = f"{'phase':10} " + " ".join(f"{'N=' + str(n):>8}" for n in ns)
  lines = [head, "-" * len(head)]
  for r in results:
    lines.append(f"{r['phase']:10} " + " ".join(
        f"{r['n'][n]:>8.4f}" if n in r["n"] else f"{'-':>8}" for n in ns))
  return "\n".join(lines)
