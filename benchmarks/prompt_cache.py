"""``python -m benchmarks.prompt_cache``: a prompt's cache stored once for its N samples.

For each model family and N, one Grow call (``Sampler.generate``, random prompts, no EOS) with
the prompt's part of the decode cache shared by its N rows (the default) and copied into every
row (``share_prompt_cache=False``, the layout before): the decode cache's bytes per prompt (from
``prefill``'s shapes), the compiled call's temporary bytes (``memory_analysis``, per device) and
generated tokens/s (best of ``repeats`` timed calls after one warm-up). Both draw the same
samples (tests/test_sampling.py). Long prompts and short samples, as for few-shot prompts, are
where sharing matters: the defaults are 256 prompt and 32 sampled tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.ceilings import timed
from rest_jax.config import MeshConfig
from rest_jax.grow import memory
from rest_jax.grow.sampler import Sampler
from rest_jax.models import build_model, get_preset
from rest_jax.parallel.meshes import layout_from_config

NEVER_EOS = -1  # No sampled token equals it: every row runs max_decode_len steps.


def _case(graphdef: Any, params: Any, *, vocab: int, prompts: int, num_samples: int,
          input_len: int, max_decode_len: int, share: bool, repeats: int) -> dict[str, Any]:
  layout = layout_from_config(MeshConfig(), devices=jax.local_devices()[:1])
  sampler = Sampler(graphdef, layout, num_samples=num_samples, max_decode_len=max_decode_len,
                    batch_size=prompts, eos_id=NEVER_EOS, share_prompt_cache=share)
  placed = sampler.place_params(params)
  fn, args = sampler.lowerable_generate(placed, batch=prompts, input_len=input_len)
  analysis = fn.lower(*args).compile().memory_analysis()
  inputs = np.random.default_rng(1).integers(2, vocab, (prompts, input_len), dtype=np.int32)
  ids = np.arange(prompts, dtype=np.int64)
  out = {}

  def run():
    out["last"] = sampler.generate(placed, inputs, ids, seed=0, grow_step=0)

  t = timed(run, repeats=repeats)
  shared, _ = memory.cache_bytes_per_prompt(graphdef, params, input_len=input_len,
                                            max_decode_len=max_decode_len,
                                            num_samples=num_samples)
  one, _ = memory.cache_bytes_per_prompt(graphdef, params, input_len=input_len,
                                         max_decode_len=max_decode_len, num_samples=1)
  tokens = int(out["last"].lengths.sum())
  return {"num_samples": num_samples, "share_prompt_cache": share,
          "cache_bytes_per_prompt": shared if share else num_samples * one,
          "temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
          "seconds": t["min_s"], "tokens_per_s": tokens / t["min_s"],
          "generated_tokens": tokens}


def measure(*, presets: tuple[str, ...] = ("small", "small_decoder"),
            num_samples: tuple[int, ...] = (4, 16, 64), prompts: int = 4, input_len: int = 256,
            max_decode_len: int = 32, repeats: int = 2) -> list[dict[str, Any]]:
  """One row per (preset, N, shared or copied); see the module docstring."""
  rows = []
  for preset in presets:
    config = get_preset(preset)
    graphdef, params = nnx.split(build_model(config, rngs=nnx.Rngs(0)))
    for n in num_samples:
      for share in (True, False):
        row = dict(preset=preset, prompts=prompts, input_len=input_len,
                   max_decode_len=max_decode_len,
                   **_case(graphdef, params, vocab=config.vocab_size, prompts=prompts,
                           num_samples=n, input_len=input_len, max_decode_len=max_decode_len,
                           share=share, repeats=repeats))
        print(f"[prompt_cache] {preset} N={n} {'shared' if share else 'copied'}: cache "
              f"{row['cache_bytes_per_prompt'] / 2**20:.2f} MiB/prompt, temp "
              f"{(row['temp_bytes'] or 0) / 2**20:.1f} MiB, {row['tokens_per_s']:.0f} tok/s",
              flush=True)
        rows.append(row)
  return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Shared against copied, per preset and N: cache bytes, temp bytes and tokens/s ratios."""
  by_key = {(r["preset"], r["num_samples"], r["share_prompt_cache"]): r for r in rows}
  out = []
  for (preset, n, share), r in by_key.items():
    copied = by_key.get((preset, n, False))
    if share and copied:
      out.append({"preset": preset, "num_samples": n,
                  "cache_bytes_copied_over_shared":
                      copied["cache_bytes_per_prompt"] / r["cache_bytes_per_prompt"],
                  "temp_bytes_copied_over_shared":
                      (copied["temp_bytes"] / r["temp_bytes"]) if r["temp_bytes"] else None,
                  "tokens_per_s_shared_over_copied": r["tokens_per_s"] / copied["tokens_per_s"]})
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+", default=["small", "small_decoder"])
  parser.add_argument("--num_samples", nargs="+", type=int, default=[4, 16, 64])
  parser.add_argument("--input_len", type=int, default=256)
  parser.add_argument("--max_decode_len", type=int, default=32)
  parser.add_argument("--out", default="", help="write the rows and ratios (JSON) here")
  args = parser.parse_args(argv)
  rows = measure(presets=tuple(args.presets), num_samples=tuple(args.num_samples),
                 input_len=args.input_len, max_decode_len=args.max_decode_len)
  result = {"rows": rows, "ratios": ratios(rows), "threads": os.cpu_count(),
            "load_average": list(os.getloadavg())}
  for r in result["ratios"]:
    print(json.dumps(r))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
