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

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.grow import base as grow_base
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


def load_phase_params(workdir: str, phase: str, layout: Any) -> tuple[str, Any, Any]:
  """(checkpoint name, graphdef, best params) of a finished phase of a workdir, on ``layout``.

  ``phase``: "bc", "final" or "gG_iI" (see ``Workdir.resolve_phase``). Reads only.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from rest_jax.checkpoints.phases import PhaseCheckpoints  # pylint: disable=g-import-not-at-top
  from rest_jax.models import build_model  # pylint: disable=g-import-not-at-top

  wd = Workdir(workdir)
  c = wd.load_run_config()
  name = wd.resolve_phase(phase)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(c.model,
                                                                    rngs=nnx.Rngs(c.seed))))
  ckpt_dir = wd.checkpoint_dir(name)
  if not storage.isdir(storage.join(ckpt_dir, "best")):
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
  from rest_jax.parallel.layout import make_layout  # pylint: disable=g-import-not-at-top

  ns = parse_ns(list(ns))
  c = Workdir(workdir).load_run_config()
  layout = make_layout(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
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
