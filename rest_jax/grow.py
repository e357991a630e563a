"""Grow step: this host's prompts -> Sampler -> RewardFn -> chunked Grow dataset on disk."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from rest_jax import growdata
from rest_jax.config import GrowConfig
from rest_jax.evaluation import detokenize, pad_rows

logger = logging.getLogger("rest_jax")

RewardCall = Callable[[Sequence[str], Sequence[str], Sequence[str] | None], np.ndarray]


def run_grow(*, sampler: Any, params: Any, prompts: Sequence[dict], reward: RewardCall,
             vocab: Any, writer: growdata.GrowWriter, grow_step: int, seed: int,
             config: GrowConfig, input_len: int, target_len: int,
             progress: bool = True) -> int:
  """Samples, scores and writes every not-yet-completed chunk of this host's prompts.

  Chunk ``k`` always holds prompts ``[k * chunk_size, (k + 1) * chunk_size)`` of ``prompts``, so
  a Grow step that crashed resumes at its first missing chunk and never writes a record twice.

  Args:
    sampler: a ``Sampler`` built with the Grow sampling settings.
    params: the policy's parameters (an ``nnx.State``), placed for sampling.
    prompts: examples of D (this host's shard) with "inputs", "targets", their texts and
      "example_id"; an example with ``"labeled": False`` is a prompt without a demonstration:
      it is sampled and scored against its reference, but never written as an original pair.
    reward: validated reward call ``(sources, hypotheses, references) -> [n]``.
    vocab: the target vocabulary.
    writer: the Grow dataset writer of this step and host.
    grow_step: 1-based Grow step.
    seed: the run seed (sampling randomness derives from seed, grow step, example id, sample).
    config: Grow settings (samples per prompt, chunk size, whether D stays in D_g).
    input_len / target_len: padded lengths of prompts and targets.
    progress: show a progress bar.
  Returns:
    The number of chunks written by this call.
  """
  num_chunks = math.ceil(len(prompts) / config.chunk_size)
  done = writer.completed_chunks()
  todo = [k for k in range(num_chunks) if k not in done]
  if done:
    logger.info("grow g%d: resuming, %d of %d chunks already complete", grow_step, len(done),
                num_chunks)
  bar = tqdm(total=len(prompts), desc=f"grow g{grow_step}", unit="prompt", disable=not progress,
             initial=len(prompts) - sum(
                 len(prompts[k * config.chunk_size:(k + 1) * config.chunk_size]) for k in todo))
  batch = config.sampling.batch_size
  for k in todo:
    chunk = prompts[k * config.chunk_size:(k + 1) * config.chunk_size]
    records: list[growdata.GrowRecord] = []
    for start in range(0, len(chunk), batch):
      part = chunk[start:start + batch]
      records.extend(_grow_batch(sampler=sampler, params=params, prompts=part, reward=reward,
                                 vocab=vocab, grow_step=grow_step, seed=seed, config=config,
                                 input_len=input_len, target_len=target_len))
      bar.update(len(part))
    writer.write_chunk(k, records)
  bar.close()
  return len(todo)


def _grow_batch(*, sampler, params, prompts, reward, vocab, grow_step, seed, config, input_len,
                target_len) -> list[growdata.GrowRecord]:
  """Samples N continuations for a batch of prompts (and scores D's pairs) into records."""
  inputs = pad_rows([p["inputs"] for p in prompts], input_len)
  example_ids = np.asarray([int(p["example_id"]) for p in prompts], dtype=np.int64)
  sources = [p["inputs_pretokenized"] for p in prompts]
  references = [p["targets_pretokenized"] for p in prompts]
  out = sampler.generate(params, inputs, example_ids, seed=seed, grow_step=grow_step)
  n = config.sampling.num_samples
  hypotheses = detokenize(vocab, out.tokens, out.lengths)
  rewards = reward([s for s in sources for _ in range(n)], hypotheses,
                   [r for r in references for _ in range(n)])
  records = []
  for row in range(len(hypotheses)):
    b = row // n
    length = int(out.lengths[row])
    records.append(growdata.GrowRecord(
        example_id=int(example_ids[b]), sample_idx=int(out.sample_idx[row]),
        inputs=np.asarray(prompts[b]["inputs"], np.int64),
        targets=np.asarray(out.tokens[row, :length], np.int64),
        inputs_pretokenized=sources[b], targets_pretokenized=hypotheses[row],
        reward=float(rewards[row]),
        behaviour_logprobs=np.asarray(out.logprobs[row, :length], np.float32),
        is_original=False, grow_step=grow_step))
  labeled = [b for b, p in enumerate(prompts) if p.get("labeled", True)]
  if config.include_originals and labeled:
    targets = pad_rows([prompts[b]["targets"] for b in labeled], target_len)
    logprobs = sampler.score(params, inputs[labeled], targets)
    original_rewards = reward([sources[b] for b in labeled], [references[b] for b in labeled],
                              [references[b] for b in labeled])
    for j, b in enumerate(labeled):
      p = prompts[b]
      length = len(p["targets"])
      records.append(growdata.GrowRecord(
          example_id=int(example_ids[b]), sample_idx=-1,
          inputs=np.asarray(p["inputs"], np.int64), targets=np.asarray(p["targets"], np.int64),
          inputs_pretokenized=sources[b], targets_pretokenized=references[b],
          reward=float(original_rewards[j]),
          behaviour_logprobs=np.asarray(logprobs[j, :length], np.float32),
          is_original=True, grow_step=grow_step))
  return records
