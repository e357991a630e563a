"""Sequence packing on a real Grow set: token fill and train tokens/s, packed vs unpacked.

``python -m benchmarks.packing --grow WORKDIR/grow/g001 --out benchmarks/results/packing_cpu_t5_64.json``

1. Selects the Improve set of the Grow set (``improve.selected``, threshold ``--threshold``)
   into a temporary folder (the Grow set is only read) and reads ``--batches`` global batches
   of ``--batch_size`` from ``ImproveBatches`` (the run's lengths, ``--input_len`` /
   ``--target_len``).
2. Fill: the share of token columns (inputs and targets) holding a real token, per batch,
   unpacked and packed into rows ``--fill_scales`` times as long (one packing group: one
   device; and 8 groups: 8 devices).
3. Throughput: the ``--model`` preset's train step (BC loss) on one device, unpacked and packed
   (``--time_scales``) on the same batches, alternating blocks of ``--steps`` steps
   (``--rounds`` of each) after one compile per shape; real (non-padding) train tokens/s of each
   and their ratio. The machine's load average is recorded, since other jobs share the CPU.
4. Grow prompt-length bucketing, estimated only: the prompt columns' fill of Grow's sampling
   batches (``--grow_batch`` prompts in example_id order) at ``input_len``, and if each batch
   were cut to its longest prompt rounded up to 16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np


def _fills(loader, batches: int, scales: list[int]) -> dict:
  from rest_jax.improve import packing  # pylint: disable=g-import-not-at-top
  out = {}
  for scale in scales:
    for groups in (1, 8):
      rows = [packing.fill(packing.pack_batch(loader.batch(k), groups=groups, scale=scale))
              for k in range(batches)]
      out[f"scale_{scale}_groups_{groups}"] = {
          "unpacked_mean": float(np.mean([r["unpacked"] for r in rows])),
          "packed_mean": float(np.mean([r["packed"] for r in rows])),
          "packed_min": float(np.min([r["packed"] for r in rows]))}
  return out


def _throughput(loader, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rest_jax.config import MeshConfig, TrainConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.improve import losses, packing  # pylint: disable=g-import-not-at-top
  from rest_jax.improve.trainer import Trainer, make_optimizer  # pylint: disable=g-import-not-at-top
  from rest_jax.models import build_model, get_preset  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel.meshes import layout_from_config  # pylint: disable=g-import-not-at-top

  layout = layout_from_config(MeshConfig(), devices=jax.devices()[:1])
  graphdef, params = nnx.split(build_model(get_preset(args.model), rngs=nnx.Rngs(0)))
  cfg = TrainConfig(num_steps=10**6, batch_size=args.batch_size, learning_rate=1e-4)
  batches = [loader.batch(k) for k in range(args.steps)]
  real = sum(int((b["inputs"] != 0).sum() + (b["targets"] != 0).sum()) for b in batches)
  variants = [0] + args.time_scales  # 0: unpacked.
  trainers = {v: Trainer(graphdef, layout, losses.make_loss(cfg), make_optimizer(cfg),
                         packing=v > 0, packing_scale=max(v, 1)) for v in variants}
  states = {v: trainers[v].init(params) for v in variants}
  for v in variants:  # Compile every shape once.
    for b in batches:
      states[v], m = trainers[v].train_step(states[v], b)
    jax.block_until_ready(m)
  times = {v: [] for v in variants}
  for _ in range(args.rounds):  # Alternating blocks: the machine's load hits all alike.
    for v in variants:
      start = time.perf_counter()
      for b in batches:
        states[v], m = trainers[v].train_step(states[v], b)
      jax.block_until_ready(m)
      times[v].append(time.perf_counter() - start)
  out = {}
  for v in variants:
    best = min(times[v])
    name = f"packed_scale_{v}" if v else "unpacked"
    out[name] = {"seconds_per_step": best / len(batches), "real_tokens_per_s": real / best,
                 "rounds_s": times[v]}
    if v:
      out[name]["speedup"] = real / best / out["unpacked"]["real_tokens_per_s"]
      out[name]["rows_per_batch"] = sorted({len(packing.pack_batch(
          b, groups=1, scale=v)["packed_inputs"]) for b in batches})
  return out


def _grow_prompts(grow: str, batch: int, input_len: int) -> dict:
  from rest_jax.grow import dataset as growdata  # pylint: disable=g-import-not-at-top
  lengths = {}
  for record in growdata.read_records(grow):
    lengths.setdefault(record.example_id, len(record.inputs))
  ordered = np.array([lengths[k] for k in sorted(lengths)])
  full, cut = [], []
  for i in range(0, len(ordered), batch):
    part = ordered[i:i + batch]
    full.append(part.sum() / (len(part) * input_len))
    cut.append(part.sum() / (len(part) * min(input_len, 16 * math.ceil(part.max() / 16))))
  return {"prompts": len(ordered), "mean_prompt_tokens": float(ordered.mean()),
          "max_prompt_tokens": int(ordered.max()), "fill_at_input_len": float(np.mean(full)),
          "fill_bucketed_16": float(np.mean(cut))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--grow", required=True, help="a finalized Grow directory (read only)")
  parser.add_argument("--out", default="")
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--input_len", type=int, default=64)
  parser.add_argument("--target_len", type=int, default=64)
  parser.add_argument("--batches", type=int, default=50, help="batches for the fill numbers")
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--grow_batch", type=int, default=128)
  parser.add_argument("--fill_scales", type=int, nargs="+", default=[1, 2, 3, 4])
  parser.add_argument("--time_scales", type=int, nargs="+", default=[1, 2, 3])
  args = parser.parse_args()

  from rest_jax.improve import batches, selected  # pylint: disable=g-import-not-at-top
  from rest_jax.improve.schedules import Threshold  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    sel = selected.select_to_disk([args.grow], os.path.join(tmp, "selected"),
                                  selected.Rules(threshold=Threshold(args.threshold)))
    loader = batches.ImproveBatches(sel, batch_size=args.batch_size, seed=0,
                                    rows=slice(0, args.batch_size), input_len=args.input_len,
                                    target_len=args.target_len)
    result = {"grow": args.grow, "records": sel.count, "args": vars(args),
              "load_before": os.getloadavg(), "fill": _fills(loader, args.batches, args.fill_scales)}
    result["throughput"] = _throughput(loader, args)
  result["grow_prompts"] = _grow_prompts(args.grow, args.grow_batch, args.input_len)
  result["load_after"] = os.getloadavg()
  print(json.dumps(result, indent=1))
  if args.out:
    from rest_jax import storage  # pylint: disable=g-import-not-at-top
    storage.write_json(args.out, result)


if __name__ == "__main__":
  main()
