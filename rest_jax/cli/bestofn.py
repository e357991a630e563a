"""Best-of-N at evaluation: sample N per held-out prompt, keep the highest-reward sample.

ReST's Figure 6: best-of-N stacks with ReST (ReST with N < 10 matches BC with N = 200). For a
saved policy, ``sample_rewards`` draws ``max(ns)`` samples per D_eval prompt once and scores
each; ``best_of_n`` then takes, for every N, the best of the FIRST N samples of each prompt, so
the numbers are nested: the N = 1 value is the mean reward of sample 0, and the curve never
decreases in N. ``run_best_of_n`` does this for a phase of a workdir (read only: nothing is
written there) and backs ``rest-jax best-of-n``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.grow import base as grow_base
from rest_jax.pipeline import build
from rest_jax.pipeline.workdir import Workdir

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


def sample_rewards(*, sampler: grow_base.Sampler, params: Any, inputs: np.ndarray,
                   sources: Sequence[str], references: Sequence[str],
                   reward: Callable[..., np.ndarray], vocab: Any, seed: int,
                   batch_size: int) -> np.ndarray:
  """Rewards of ``sampler.num_samples`` samples per prompt.

  Args:
    sampler: a ``grow.base.Sampler`` with ``num_samples = max N``.
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
  from rest_jax.tasks.data import detokenize  # pylint: disable=g-import-not-at-top

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


def load_phase_params(workdir: str, phase: str,
                      parts: build.Parts | None = None) -> tuple[str, build.Parts, nnx.State]:
  """(phase name, the run's Parts, best params) of a finished phase of a workdir. Reads only.

  ``phase``: "bc", "final" or "gG_iI" (see ``Workdir.resolve_phase``); ``parts``: the run
  resolved from the workdir's recorded config (``build.resolve``) unless given.
  """
  wd = Workdir(workdir)
  name = wd.resolve_phase(phase)
  parts = parts or build.resolve(wd.load_run_config())
  ckpt_dir = wd.checkpoint_dir(name)
  if not storage.isdir(storage.join(ckpt_dir, "best")):
    raise RestJaxError(f"{ckpt_dir}/best does not exist; phase {name} saved no checkpoint.")
  return name, parts, build.restore_best(parts, wd, name)


def run_best_of_n(workdir: str, *, phase: str, ns: Sequence[int], num_examples: int = 0,
                  temperature: float | None = None, seed: int | None = None,
                  batch_size: int = 0) -> dict:
  """Best-of-N of a saved policy on the workdir's D_eval, scored by its training reward.

  The run is resolved from its recorded config through ``pipeline.build`` (the run's Layout,
  model, task, reward and eval set); samples use the run's Grow sampling settings (temperature
  overridable). Reads the workdir and its checkpoints; writes nothing there.

  Returns:
    {"phase", "n": {N: mean best reward}, "mean_sample_reward", "num_examples",
     "temperature", "reward"}.
  """
  from rest_jax.grow.sampler import Sampler  # pylint: disable=g-import-not-at-top

  ns = parse_ns(list(ns))
  c = Workdir(workdir).load_run_config()
  name, parts, params = load_phase_params(workdir, phase)
  task, vocab = build.task_and_vocab(c)
  eval_set = build.eval_set(c, task, num_examples)
  sampling = c.grow.sampling
  temp = sampling.temperature if temperature is None else float(temperature)
  batch = batch_size or c.eval.batch_size
  sampler = Sampler(parts.graphdef, parts.layout, num_samples=max(ns),
                    max_decode_len=sampling.max_decode_len, temperature=temp,
                    top_k=sampling.top_k, top_p=sampling.top_p, batch_size=batch)
  scores = sample_rewards(
      sampler=sampler, params=params, inputs=eval_set.inputs, sources=eval_set.sources,
      references=eval_set.references, vocab=vocab, reward=build.make_reward(c, parts.layout),
      seed=c.seed if seed is None else seed, batch_size=batch)
  return {"phase": name, "n": best_of_n(scores, ns), "mean_sample_reward": float(scores.mean()),
          "num_examples": len(eval_set.inputs), "temperature": temp, "reward": c.reward}


def format_best_of_n(results: Sequence[dict]) -> str:
  """A text table: one row per phase, one column per N."""
  ns = sorted({n for r in results for n in r["n"]})
  head = f"{'phase':10} " + " ".join(f"{'N=' + str(n):>8}" for n in ns)
  lines = [head, "-" * len(head)]
  for r in results:
    lines.append(f"{r['phase']:10} " + " ".join(
        f"{r['n'][n]:>8.4f}" if n in r["n"] else f"{'-':>8}" for n in ns))
  return "\n".join(lines)
