"""Pass@k and diversity of sampled answers on held-out prompts (the test split).

ReST-EM is known to overfit after a few iterations: the greedy answer improves while the
policy collapses onto fewer distinct answers. ``make_sample_eval_fn`` draws ``N`` samples per
test prompt from a phase's chosen params and reports

  * ``{prefix}_pass@k`` for k = 1, 2, 4, ... up to N (and N): the unbiased estimator of
    Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` per prompt with c of its n samples
    correct (reward >= ``pass_threshold``), averaged over prompts;
  * ``{prefix}_distinct_1`` / ``{prefix}_distinct_2`` (and their standard errors ``*_se``):
    distinct-n (Li et al., 2016) of each prompt's N samples (distinct word n-grams / all word
    n-grams of the N samples), averaged over prompts: 1.0 when no n-gram repeats across the
    samples of a prompt, 1/N when all N samples are the same;
  * ``{prefix}_sample_reward``: the mean reward of the samples.

The samples are fixed by the run's seed, the prompt's index and the sample index (a stream of
their own, apart from every Grow step's), so evaluating the same params twice gives the same
numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rest_jax.evaluation import EvalFn, EvalSet, standard_error
from rest_jax.grow.base import Sampler
from rest_jax.tasks.data import detokenize

# The "grow step" that seeds test-split samples: no Grow step of a run reaches it.
TEST_SAMPLE_STREAM = 2**31 - 1
DISTINCT_NS = (1, 2)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al.,
  2021): ``1 - C(n - c, k) / C(n, k)``, computed as a stable product; needs 1 <= k <= n."""
  if not 1 <= k <= n or not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_up_to(n: int) -> list[int]:
  """The k reported for N = ``n`` samples: 1, 2, 4, ... below n, and n."""
  ks, k = [], 1
  while k < n:
    ks.append(k)
    k *= 2
  return ks + [n]


def pass_at_ks(correct: np.ndarray) -> dict[int, float]:
  """``{k: mean over prompts of pass@k}`` of bool `[num_prompts, n]` (k from ``ks_up_to``)."""
  correct = np.asarray(correct, dtype=bool)
  n = correct.shape[1]
  counts = correct.sum(axis=1)
  return {k: float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks_up_to(n)}


def distinct_n(samples: Sequence[str], n: int) -> float | None:
  """Distinct word n-grams / all word n-grams of one prompt's samples (None: no n-gram)."""
  grams = [tuple(words[i:i + n]) for words in (s.split() for s in samples)
           for i in range(len(words) - n + 1)]
  return len(set(grams)) / len(grams) if grams else None


def distinct_stats(groups: Sequence[Sequence[str]], n: int) -> tuple[float, float] | None:
  """Mean and standard error over prompts of ``distinct_n`` of each prompt's samples (prompts
  whose samples have no n-gram are left out; None when none has one)."""
  values = [v for v in (distinct_n(g, n) for g in groups) if v is not None]
  if not values:
    return None
  return float(np.mean(values)), standard_error(np.asarray(values))


def make_sample_eval_fn(*, sampler: Sampler, eval_set: EvalSet,
                        reward: Callable[..., np.ndarray], vocab: Any, batch_size: int,
                        seed: int, pass_threshold: float = 1.0, prefix: str = "test") -> EvalFn:
  """Returns ``eval_fn(params) -> {"{prefix}_pass@k", "{prefix}_distinct_n"(_se),
  "{prefix}_sample_reward"}`` from ``sampler.num_samples`` samples per prompt.

  Args:
    sampler: draws ``num_samples`` (N) samples per prompt (``generate``).
    eval_set: the prompts `[num_prompts, input_len]` and their references.
    reward: ``reward(sources, hypotheses, references) -> [n]`` validated rewards in [0, 1].
    vocab: the target vocabulary (``decode(ids) -> str``).
    batch_size: prompts per ``generate`` call.
    seed: the run's seed (with ``TEST_SAMPLE_STREAM``, the prompt index and the sample index
      it fixes every sample).
    pass_threshold: a sample is correct when its reward is >= this.
    prefix: the keys' prefix.
  """
  n = sampler.num_samples
  num_prompts = len(eval_set.inputs)

  def eval_fn(params: Any) -> dict[str, float]:
    placed = sampler.place_params(params)
    texts: list[str] = []
    for start in range(0, num_prompts, batch_size):
      inputs = eval_set.inputs[start:start + batch_size]
      out = sampler.generate(placed, inputs, np.arange(start, start + len(inputs)),
                             seed=seed, grow_step=TEST_SAMPLE_STREAM)
      texts.extend(detokenize(vocab, out.tokens, out.lengths))
    sources = [s for s in eval_set.sources for _ in range(n)]
    references = [r for r in eval_set.references for _ in range(n)]
    rewards = np.asarray(reward(sources, texts, references), dtype=np.float64)
    metrics = {f"{prefix}_pass@{k}": v
               for k, v in pass_at_ks((rewards >= pass_threshold).reshape(-1, n)).items()}
    groups = [texts[i * n:(i + 1) * n] for i in range(num_prompts)]
    for order in DISTINCT_NS:
      stats = distinct_stats(groups, order)
      if stats is not None:  # Left out where no answer has n words (e.g. one-number answers).
        metrics[f"{prefix}_distinct_{order}"], metrics[f"{prefix}_distinct_{order}_se"] = stats
    metrics[f"{prefix}_sample_reward"] = float(np.mean(rewards))
    return metrics

  return eval_fn
