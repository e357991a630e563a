#!/usr/bin/env python
"""Fits a learned reward model from the arrays of `rest-jax train-reward --export_arrays`.

For an accelerator host that has jax, flax, optax and orbax but not the data stack (seqio,
TensorFlow, sacrebleu): encode and split on a CPU host, copy the .npz over, fit there, copy the
output directory back. The output is a reward-model directory (use it as reward
'learned:OUT_DIR') plus curve.json (held-out Kendall tau every --eval_every steps).

  rest-jax train-reward --data W --output_dir unused --model small --export_arrays pairs.npz
  python launch/fit_reward_arrays.py pairs.npz OUT_DIR --num_steps 20000 --batch_size 256 \
      [--preset small] [--set d_model=256 --set num_encoder_layers=4] [--ranking_weight 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _import_fitting():
  """rest_jax.rewards.fitting, also where rest_jax/rewards/__init__.py's imports (seqio,
  sacrebleu) are missing: its package is then loaded without running that __init__."""
  try:
    from rest_jax.rewards import fitting  # pylint: disable=g-import-not-at-top
    return fitting
  except ImportError as e:
    print(f"note: {e}; loading rest_jax.rewards.fitting without the rewards package __init__",
          file=sys.stderr)
    import types  # pylint: disable=g-import-not-at-top
    for name in [m for m in sys.modules if m.startswith("rest_jax.rewards")]:
      del sys.modules[name]
    pkg = types.ModuleType("rest_jax.rewards")
    pkg.__path__ = [os.path.join(ROOT, "rest_jax", "rewards")]
    sys.modules["rest_jax.rewards"] = pkg
    from rest_jax.rewards import fitting  # pylint: disable=g-import-not-at-top
    return fitting


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("arrays", help=".npz from rest-jax train-reward --export_arrays")
  ap.add_argument("output_dir", help="new reward-model directory")
  ap.add_argument("--preset", default=None, help="model preset (default: the exported model)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                  help="override an integer ModelConfig field, e.g. --set d_model=256")
  for name, kind, default in (("num_steps", int, 2000), ("batch_size", int, 64),
                              ("learning_rate", float, 1e-3), ("warmup_steps", int, 100),
                              ("seed", int, 0), ("ranking_weight", float, 0.0),
                              ("weight_decay", float, 0.0), ("eval_every", int, 0),
                              ("steps_per_call", int, 50), ("max_seconds", float, 0.0)):
    ap.add_argument(f"--{name}", type=kind, default=default)
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)

  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rest_jax.errors import RestJaxError  # pylint: disable=g-import-not-at-top
  from rest_jax.models.base import ModelConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.models.presets import get_preset  # pylint: disable=g-import-not-at-top
  fitting = _import_fitting()

  if os.path.exists(os.path.join(args.output_dir, fitting.META)):
    raise RestJaxError(f"{args.output_dir} already holds a reward model; choose a new "
                       "output directory or delete it.")
  if not os.path.isfile(args.arrays):
    raise RestJaxError(f"{args.arrays} does not exist; write it with `rest-jax train-reward "
                       "--export_arrays`.")
  with np.load(args.arrays) as f:
    arrays = {k: f[k] for k in f.files}
  meta = json.loads(str(arrays.pop("meta")))
  model = get_preset(args.preset) if args.preset else ModelConfig(**meta["model"])
  overrides = dict(item.split("=", 1) for item in args.set)
  model = dataclasses.replace(model, **{k: int(v) for k, v in overrides.items()})
  cfg = fitting.RewardTrainConfig(
      num_steps=args.num_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
      warmup_steps=args.warmup_steps, input_len=meta["input_len"], target_len=meta["target_len"],
      seed=args.seed, ranking_weight=args.ranking_weight, weight_decay=args.weight_decay,
      eval_every=args.eval_every, steps_per_call=args.steps_per_call,
      max_seconds=args.max_seconds)
  train, held = (fitting.EncodedPairs(arrays[f"{p}_inputs"], arrays[f"{p}_targets"],
                                      arrays[f"{p}_scores"]) for p in ("train", "held"))
  params, metrics, curve = fitting.fit_reward_model(train, held, model=model, cfg=cfg,
                                                    progress=not args.no_progress)
  metrics = dict(metrics, curve=curve, fit_config=dataclasses.asdict(cfg))
  fitting.write_reward_model_dir(args.output_dir, params, model=model,
                                 vocabulary=meta["vocabulary"], input_len=meta["input_len"],
                                 target_len=meta["target_len"], metrics=metrics)
  print(json.dumps({k: v for k, v in metrics.items() if k not in ("curve", "fit_config")}))
  return metrics


if __name__ == "__main__":
  main()
