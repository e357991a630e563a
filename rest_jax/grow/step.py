"""Grow step: this host's prompts -> Sampler -> RewardFn -> chunked Grow dataset on disk."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rest_jax.parallel import distributed, preemption

from rest_jax.grow import dataset as growdata
from rest_jax.grow.base import SampleOutput, Sampler
from rest_jax.config import GrowConfig
from rest_jax.tasks.data import detokenize, pad_rows
from rest_jax.models.base import EOS_ID

logger = logging.getLogger("rest_jax")

RewardCall = Callable[[Sequence[str], Sequence[str], Sequence[str] | None], np.ndarray]


def run_grow(*, sampler: Sampler, params: Any, prompts: Sequence[dict], reward: RewardCall,
             vocab: Any, writer: growdata.GrowWriter, grow_step: int, seed: int,
             config: GrowConfig, input_len: int, target_len: int,
             progress: bool = True) -> int:
  """Samples, scores and writes every not-yet-completed chunk of this host's prompts.

  Chunk ``k`` always holds prompts ``[k * chunk_size, (k + 1) * chunk_size)`` of ``prompts``, so
  a Grow step that crashed resumes at its first missing chunk and never writes a record twice.
  After SIGTERM every host stops after the same sampler batch (an unfinished chunk is dropped)
  and ``preemption.Preempted`` is raised.

  Args:
    sampler: a ``Sampler`` (``grow.base``) with the Grow sampling settings.
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
  cs = config.chunk_size
  counts, mine, todo = chunks_to_do(len(prompts), cs, writer, grow_step)
  bar = tqdm(total=len(prompts), desc=f"grow g{grow_step}", unit="prompt",
             disable=not progress or not distributed.is_host0(),
             initial=len(prompts) - sum(len(prompts[k * cs:(k + 1) * cs]) for k in todo))
  batch = config.sampling.batch_size // len(counts)  # Prompts per host per sampler call.
  filler = prompts[0] if prompts else None
  try:
    for k in todo:
      chunk = prompts[k * cs:(k + 1) * cs]
      records: list[growdata.GrowRecord] = []
      starts = range(0, int(np.clip(counts - k * cs, 0, cs).max()), batch)
      for start in starts:
        part = chunk[start:start + batch]
        records.extend(grow_batch(sampler=sampler, params=params, prompts=part, reward=reward,
                                   vocab=vocab, grow_step=grow_step, seed=seed, config=config,
                                   input_len=input_len, target_len=target_len,
                                   host_rows=batch, filler=filler))
        bar.update(len(part))
        # SIGTERM: every host drops its unfinished chunk k (sampled again, identically, on rerun).
        if start != starts[-1] and preemption.reached():
          raise preemption.stop(f"grow g{grow_step} kept its complete chunks and dropped the "
                                f"unfinished chunk {k} (sampled again on rerun)")
      finish_chunk(writer, k, records, mine=mine[k], grow_step=grow_step)
  finally:
    bar.close()
  return sum(mine)


def finish_chunk(writer: growdata.GrowWriter, k: int, records: list[growdata.GrowRecord], *,
                 mine: bool, grow_step: int) -> None:
  """Writes chunk ``k`` when this host owns it, then stops here on SIGTERM (every host at the
  same chunk: the written chunks are complete and kept)."""
  if mine:
    writer.write_chunk(k, records)
  if preemption.reached():
    raise preemption.stop(f"grow g{grow_step} kept its complete chunks, up to chunk {k}")


def chunks_to_do(num_prompts: int, chunk_size: int, writer: growdata.GrowWriter,
                 grow_step: int) -> tuple[np.ndarray, list[bool], list[int]]:
  """Which chunks this Grow call samples, agreed by every host.

  Every host runs the same sequence of sampler calls (they are collective): the chunks that any
  host still misses, each in as many batches as the largest host share needs.
  Returns:
    int `[hosts]` prompts per host; bool per chunk index: this host still writes it; the chunk
    indices every host samples, in order.
  """
  num_chunks = math.ceil(num_prompts / chunk_size)
  done = writer.completed_chunks()
  counts = distributed.allgather(np.asarray([num_prompts]))[:, 0]
  mine = [k < num_chunks and k not in done
          for k in range(math.ceil(counts.max() / chunk_size))]
  missing = distributed.allgather(np.asarray(mine, dtype=bool)).any(axis=0)
  if done:
    logger.info("grow g%d: resuming, %d of %d chunks already complete", grow_step, len(done),
                num_chunks)
  return counts, mine, [k for k in range(len(mine)) if missing[k]]


def _global_rows(x: np.ndarray, host_rows: int, fill: np.ndarray) -> np.ndarray:
  """This host's rows, padded to ``host_rows`` with ``fill``, gathered from every host.

  Args:
    x: `[rows, ...]` with rows <= host_rows; fill: `[...]`, one row.
  Returns:
    `[process_count * host_rows, ...]`; host h's rows start at ``h * host_rows`` (every host
    gets the same array).
  """
  if x.shape[0] < host_rows:
    x = np.concatenate([x, np.repeat(fill[None], host_rows - x.shape[0], axis=0)])
  gathered = distributed.allgather(x.astype(fill.dtype))
  return gathered.reshape((-1,) + gathered.shape[2:])


def _sample_global(*, sampler: Sampler, params: Any, inputs: np.ndarray,
                   example_ids: np.ndarray, grow_step: int, seed: int, host_rows: int,
                   filler: dict | None, input_len: int, num_samples: int,
                   first_sample: int = 0) -> SampleOutput:
  """``sampler.generate`` on every host's prompts at once; returns this host's rows.

  With one process the prompts go to the sampler as they are. Otherwise each host's
  `[rows, input_len]` prompts are padded to ``host_rows`` (with copies of a real prompt, whose
  samples are dropped), gathered into one global batch, sampled, and this host's rows kept.
  """
  n = num_samples
  if jax.process_count() == 1:
    return sampler.generate(params, inputs, example_ids, seed=seed, grow_step=grow_step,
                            first_sample=first_sample)
  fill_inputs = (pad_rows([filler["inputs"]], input_len)[0] if filler is not None
                 else pad_rows([[EOS_ID]], input_len)[0])
  fill_id = np.int64(filler["example_id"] if filler is not None else 0)
  out = sampler.generate(params, _global_rows(inputs, host_rows, fill_inputs),
                         _global_rows(example_ids, host_rows, fill_id), seed=seed,
                         grow_step=grow_step, first_sample=first_sample)
  start, stop = jax.process_index() * host_rows * n, (jax.process_index() * host_rows +
                                                      len(inputs)) * n
  return dataclasses.replace(out, tokens=out.tokens[start:stop],
                             logprobs=out.logprobs[start:stop], lengths=out.lengths[start:stop],
                             example_ids=out.example_ids[start:stop],
                             sample_idx=out.sample_idx[start:stop])


def _score_global(*, sampler: Sampler, params: Any, inputs: np.ndarray, targets: np.ndarray,
                  host_rows: int) -> np.ndarray | None:
  """``sampler.score`` on every host's pairs at once; this host's `[rows, target_len]` rows.

  Returns None when no host has a pair (then no host calls the sampler).
  """
  if jax.process_count() == 1:
    return sampler.score(params, inputs, targets) if len(inputs) else None
  if distributed.allgather(np.asarray([len(inputs)])).max() == 0:
    return None
  fill_inputs = np.zeros(inputs.shape[1:], np.int32)
  fill_inputs[0] = EOS_ID
  fill_targets = np.zeros(targets.shape[1:], np.int32)
  fill_targets[0] = EOS_ID
  logprobs = sampler.score(params, _global_rows(inputs, host_rows, fill_inputs),
                           _global_rows(targets, host_rows, fill_targets))
  start = jax.process_index() * host_rows
  return logprobs[start:start + len(inputs)]


def grow_batch(*, sampler: Sampler, params: Any, prompts: Sequence[dict], reward: RewardCall,
               vocab: Any, grow_step: int, seed: int, config: GrowConfig, input_len: int,
               target_len: int, host_rows: int, filler: dict | None, first_sample: int = 0,
               originals: bool = True) -> list[growdata.GrowRecord]:
  """Samples N continuations (sample indices ``first_sample`` and up) for a batch of this
  host's prompts (and, with ``originals`` and ``GrowConfig.include_originals``, scores D's
  pairs) into records; ``prompts`` may be empty (the host still joins the collective sampler
  calls)."""
  inputs = pad_rows([p["inputs"] for p in prompts], input_len)
  example_ids = np.asarray([int(p["example_id"]) for p in prompts], dtype=np.int64)
  sources = [p["inputs_pretokenized"] for p in prompts]
  references = [p["targets_pretokenized"] for p in prompts]
  out = _sample_global(sampler=sampler, params=params, inputs=inputs, example_ids=example_ids,
                       grow_step=grow_step, seed=seed, host_rows=host_rows, filler=filler,
                       input_len=input_len, num_samples=config.sampling.num_samples,
                       first_sample=first_sample)
  n = config.sampling.num_samples
  hypotheses = detokenize(vocab, out.tokens, out.lengths)
  rewards = (reward([s for s in sources for _ in range(n)], hypotheses,
                    [r for r in references for _ in range(n)]) if prompts else [])
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
  if not (config.include_originals and originals):
    return records
  targets = pad_rows([prompts[b]["targets"] for b in labeled], target_len)
  logprobs = _score_global(sampler=sampler, params=params, inputs=inputs[labeled],
                           targets=targets, host_rows=host_rows)
  if labeled:
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
