"""Adaptive sampling budgets: Grow samples each prompt in rounds and stops a solved prompt.

Round r draws ``N = SamplingConfig.num_samples`` samples of every still-active prompt, with
sample indices ``r * N .. r * N + N - 1``; a prompt stops once ``k = AdaptiveConfig.min_passing``
of its samples have reward >= the threshold, or after ``N_max = AdaptiveConfig.max_samples``.
A sample's key depends on the run seed, the Grow step, the example id and the sample index only
(``grow.decoding.row_keys``), and a prompt's stop depends on its own rewards only, so:

* the records of a prompt are the first ``R * N`` samples a fixed-N_max Grow draws for it (the
  same tokens and rewards), whatever the batch size or the number of hosts;
* a chunk is still the unit of resume: a preempted chunk is sampled again, round by round, to
  the same records.

Every host runs the same sequence of (collective) sampler calls: per round, as many batches as
the host with the most active prompts needs (hosts with fewer pass empty batches).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rest_jax.config import GrowConfig
from rest_jax.grow import dataset as growdata
from rest_jax.grow.base import Sampler
from rest_jax.grow.step import RewardCall, chunks_to_do, finish_chunk, grow_batch
from rest_jax.parallel import distributed, preemption


def run_adaptive_grow(*, sampler: Sampler, params: Any, prompts: Sequence[dict],
                      reward: RewardCall, vocab: Any, writer: growdata.GrowWriter,
                      grow_step: int, seed: int, config: GrowConfig, threshold: float,
                      input_len: int, target_len: int, progress: bool = True) -> int:
  """``grow.step.run_grow`` with adaptive budgets (``config.adaptive``; see the module doc).

  Args:
    sampler: draws ``config.sampling.num_samples`` samples per prompt per call (one round).
    threshold: a sample passes at reward >= threshold (float32 comparison, as the selection's).
    (the rest as ``run_grow``.)
  Returns:
    The number of chunks written by this call.
  """
  cs = config.chunk_size
  _, mine, todo = chunks_to_do(len(prompts), cs, writer, grow_step)
  batch = config.sampling.batch_size // jax.process_count()  # Prompts per host per call.
  filler = prompts[0] if prompts else None
  bar = tqdm(total=len(prompts), desc=f"grow g{grow_step} (adaptive)", unit="prompt",
             disable=not progress or not distributed.is_host0(),
             initial=len(prompts) - sum(len(prompts[k * cs:(k + 1) * cs]) for k in todo
                                        if mine[k]))
  try:
    for k in todo:
      chunk = prompts[k * cs:(k + 1) * cs] if mine[k] else []
      records = _adaptive_chunk(
          chunk, bar=bar, k=k, threshold=threshold, batch=batch, config=config,
          grow_step=grow_step, sample=lambda part, first, originals: grow_batch(
              sampler=sampler, params=params, prompts=part, reward=reward, vocab=vocab,
              grow_step=grow_step, seed=seed, config=config, input_len=input_len,
              target_len=target_len, host_rows=batch, filler=filler, first_sample=first,
              originals=originals))
      finish_chunk(writer, k, records, mine=mine[k], grow_step=grow_step)
  finally:
    bar.close()
  return sum(mine)


def _adaptive_chunk(chunk: Sequence[dict], *, bar: Any, k: int, threshold: float, batch: int,
                    sample: Callable[[list[dict], int, bool], list[growdata.GrowRecord]],
                    config: GrowConfig, grow_step: int) -> list[growdata.GrowRecord]:
  """The records of one chunk's prompts (possibly none on this host), round by round.

  ``sample(prompts, first_sample, originals)`` samples one batch (``step.grow_batch``).
  Returns the records per prompt in chunk order: samples by index, then the original.
  """
  n = config.sampling.num_samples
  rounds = config.adaptive.max_samples // n
  tau = np.float32(threshold)
  position = {int(p["example_id"]): i for i, p in enumerate(chunk)}
  samples: list[list[growdata.GrowRecord]] = [[] for _ in chunk]
  originals: list[list[growdata.GrowRecord]] = [[] for _ in chunk]
  passing = np.zeros(len(chunk), np.int64)
  active = list(range(len(chunk)))
  for r in range(rounds):
    num_batches = int(distributed.allgather(
        np.asarray([math.ceil(len(active) / batch)]))[:, 0].max())
    if num_batches == 0:
      break
    for j in range(num_batches):
      part = [chunk[i] for i in active[j * batch:(j + 1) * batch]]
      for record in sample(part, r * n, r == 0):
        i = position[int(record.example_id)]
        (originals if record.is_original else samples)[i].append(record)
        if not record.is_original and np.float32(record.reward) >= tau:
          passing[i] += 1
      # SIGTERM: every host drops its unfinished chunk k (sampled again, identically, on rerun).
      if preemption.reached():
        raise preemption.stop(f"grow g{grow_step} kept its complete chunks and dropped the "
                              f"unfinished chunk {k} (sampled again on rerun)")
    still = [i for i in active if passing[i] < config.adaptive.min_passing]
    bar.update(len(active) - (len(still) if r + 1 < rounds else 0))
    active = still
  return [rec for i in range(len(chunk))
          for rec in sorted(samples[i], key=lambda x: x.sample_idx) + originals[i]]

