#!/usr/bin/env python
"""Scored samples of the numbers_de_en task from a workdir's saved policies (reward-model data).

A reward model for the numbers task learns from (German source, English hypothesis, chrF)
triples. The Grow data of one run holds about 15k distinct ones; this script draws more from
the same policies: for every phase and temperature, ``--num_samples`` samples for each of
``--num_prompts`` numbers drawn from [0, 99999] minus the task's D_eval (validation) numbers,
scored by chrF against num2words' English. Appends JSONL lines {"example_id" (the number),
"source", "hypothesis", "score", "phase", "temperature"}; `rest-jax train-reward --data W
THIS.jsonl` reads them next to the workdir's own Grow records. Deterministic in its arguments.

  python launch/numbers_reward_pairs.py workdirs/numbers_de_en pairs.jsonl \
      --phases bc,g1_i2,g2_i2 --temps 0.7,1.1 --num_prompts 8000 --num_samples 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("workdir", help="a finished numbers_de_en run")
  ap.add_argument("out", help="JSONL file to append to")
  ap.add_argument("--phases", default="bc,g1_i2,g2_i2", help="bc, final or gG_iI, comma-separated")
  ap.add_argument("--temps", default="0.7,1.1", help="sampling temperatures, comma-separated")
  ap.add_argument("--num_prompts", type=int, default=8000)
  ap.add_argument("--num_samples", type=int, default=2, help="samples per prompt per setting")
  ap.add_argument("--batch_size", type=int, default=512)
  ap.add_argument("--seed", type=int, default=1)
  a = ap.parse_args(argv)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from num2words import num2words  # pylint: disable=g-import-not-at-top

  from rest_jax import rewards, tasks  # pylint: disable=g-import-not-at-top

  from rest_jax.cli import bestofn  # pylint: disable=g-import-not-at-top

  from rest_jax.tasks import data  # pylint: disable=g-import-not-at-top
  from rest_jax.tasks.data import detokenize  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards.learned import encode  # pylint: disable=g-import-not-at-top
  from rest_jax.grow.sampler import Sampler  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline.workdir import Workdir  # pylint: disable=g-import-not-at-top
  from rest_jax.config import MeshConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline import build  # pylint: disable=g-import-not-at-top

  c = Workdir(a.workdir).load_run_config()
  task = tasks.get_task(c.task)
  held = {int(e["example_id"]) for e in data.examples(task, "validation", input_len=c.input_len,
                                                        target_len=c.target_len)}
  nums = [int(n) for n in np.random.default_rng(a.seed).permutation(100_000)
          if int(n) not in held][:a.num_prompts]
  vocab = seqio.ByteVocabulary()
  sources = [num2words(n, lang="de") for n in nums]
  refs = [num2words(n, lang="en") for n in nums]
  inputs = encode(vocab, sources, c.input_len)
  # All local devices data-parallel, whatever mesh the run used.
  parts = build.resolve(dataclasses.replace(c, mesh=MeshConfig()))
  graphdef, layout = parts.graphdef, parts.layout
  chrf = rewards.get_reward("chrf")
  with open(a.out, "a", encoding="utf-8") as f:
    for phase in a.phases.split(","):
      name, parts, params = bestofn.load_phase_params(a.workdir, phase, parts)
      for ti, temp in enumerate(float(t) for t in a.temps.split(",")):
        start_time, n = time.time(), 0
        sampler = Sampler(graphdef, layout, num_samples=a.num_samples,
                          max_decode_len=c.grow.sampling.max_decode_len, temperature=temp,
                          batch_size=a.batch_size)
        placed = sampler.place_params(params)
        for start in range(0, len(nums), a.batch_size):
          chunk = inputs[start:start + a.batch_size]
          out = sampler.generate(placed, chunk,
                                 np.arange(start, start + len(chunk), dtype=np.int64),
                                 seed=a.seed * 1000 + ti,
                                 grow_step=zlib.crc32(phase.encode()) % 1000 + 10)
          hyps = detokenize(vocab, out.tokens, out.lengths)
          idx = np.repeat(np.arange(start, start + len(chunk)), a.num_samples)
          scores = chrf([sources[i] for i in idx], hyps, [refs[i] for i in idx])
          for i, hyp, score in zip(idx, hyps, scores):
            f.write(json.dumps({"example_id": nums[i], "source": sources[i], "hypothesis": hyp,
                                "score": float(score), "phase": name, "temperature": temp})
                    + "\n")
            n += 1
        print(f"{name} T={temp}: {n} samples in {time.time() - start_time:.1f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
