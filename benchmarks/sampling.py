"""``python -m benchmarks.sampling``: the sampling draw of one decode step, before and after.

Times ``rest_jax.grow.decoding.sample_logits`` (inverse CDF: one uniform number per row) against
the draw it replaced (``jax.random.categorical``: one Gumbel number per vocabulary entry) on
`[rows, vocab]` logits, for the plain, top-k and top-p distributions. Prints a table and
returns the rows; ``benchmarks.run`` records them in its results.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.ceilings import timed
from rest_jax.grow.decoding import sample_logits

VARIANTS = ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 40},
            {"temperature": 0.8, "top_p": 0.9})


def categorical_reference(logits: jax.Array, keys: jax.Array, *, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The previous draw: filter `[batch, vocab]` logits in place, then ``categorical``."""

  def one(row, key):
    row = row.astype(jnp.float32) / temperature
    vocab = row.shape[-1]
    if 0 < top_k < vocab:
      _, idx = jax.lax.top_k(row, top_k)
      row = jnp.where(jnp.zeros((vocab,), bool).at[idx].set(True), row, -jnp.inf)
    if top_p < 1.0:
      order = jnp.argsort(-row, stable=True)
      probs = jax.nn.softmax(row[order])
      keep = jnp.zeros((vocab,), bool).at[order].set((jnp.cumsum(probs) - probs) < top_p)
      row = jnp.where(keep, row, -jnp.inf)
    token = jax.random.categorical(key, row)
    return token.astype(jnp.int32), jax.nn.log_softmax(row)[token]

  return jax.vmap(one)(logits, keys)


def measure(*, rows: int = 256, vocab: int = 32128, repeats: int = 5) -> list[dict[str, Any]]:
  """Seconds of one draw for `[rows, vocab]` logits: before (categorical) and after."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, vocab)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), rows)
  out = []
  for kw in VARIANTS:
    seconds = {}
    for name, fn in (("categorical_s", categorical_reference), ("inverse_cdf_s", sample_logits)):
      jitted = jax.jit(lambda l, k, fn=fn, kw=kw: fn(l, k, **kw))
      seconds[name] = timed(lambda: jax.block_until_ready(jitted(logits, keys)),
                            repeats=repeats)["min_s"]
    out.append({"rows": rows, "vocab": vocab, **{k: v for k, v in kw.items()}, **seconds,
                "speedup": seconds["categorical_s"] / seconds["inverse_cdf_s"]})
  return out


def measure_decode(*, preset: str = "wmt_base", prompts: int = 256, input_len: int = 32,
                   max_decode_len: int = 32, rounds: int = 2) -> dict[str, Any]:
  """Seconds of one whole Grow call (``Sampler.generate``) with each draw, interleaved.

  The categorical draw is put back in ``rest_jax.grow.decoding`` for its calls; the rounds
  alternate (categorical, inverse CDF, ...) so load from other processes hits both alike.
  Returns the best seconds of each and the per-decode-step difference.
  """
  from benchmarks import workloads  # pylint: disable=import-outside-toplevel
  from rest_jax.grow import decoding  # pylint: disable=import-outside-toplevel
  config = workloads.model_config(preset, dtype="float32", param_dtype="float32")
  new = decoding.sample_logits
  best: dict[str, list[float]] = {"categorical": [], "inverse_cdf": []}
  rows = None
  for _ in range(rounds):
    for name, fn in (("categorical", categorical_reference), ("inverse_cdf", new)):
      decoding.sample_logits = fn
      try:  # A new Sampler: its jit traces the draw now in place.
        rows = workloads.grow(config, prompts=prompts, num_samples=1, input_len=input_len,
                              max_decode_len=max_decode_len, repeats=1, peak_flops=1.0,
                              bandwidth=1.0)
      finally:
        decoding.sample_logits = new
      best[name].append(rows["seconds"])
  before, after = min(best["categorical"]), min(best["inverse_cdf"])
  steps = rows["decode_steps"] + 1  # + the draw from the prefill's logits.
  return {"preset": preset, "rows": prompts, "input_len": input_len,
          "max_decode_len": max_decode_len, "categorical_s": before, "inverse_cdf_s": after,
          "all_s": best, "per_step_categorical_s": before / steps,
          "per_step_inverse_cdf_s": after / steps, "speedup": before / after}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=32128)
  parser.add_argument("--decode", action="store_true",
                      help="also time whole Grow calls (wmt_base, --rows prompts x 32 tokens) "
                           "with each draw")
  args = parser.parse_args(argv)
  print("| rows | vocab | options | categorical s | inverse CDF s | speedup |\n"
        "|---|---|---|---|---|---|")
  for r in measure(rows=args.rows, vocab=args.vocab):
    options = {k: r[k] for k in ("temperature", "top_k", "top_p") if k in r}
    print(f"| {r['rows']} | {r['vocab']} | {options} | {r['categorical_s']:.4f} | "
          f"{r['inverse_cdf_s']:.4f} | {r['speedup']:.1f}x |")
  if args.decode:
    r = measure_decode(prompts=args.rows)
    print(f"Grow call, {r['preset']}, {r['rows']} rows x {r['max_decode_len']} tokens: "
          f"categorical {r['categorical_s']:.2f} s ({r['per_step_categorical_s']:.3f} s/step), "
          f"inverse CDF {r['inverse_cdf_s']:.2f} s ({r['per_step_inverse_cdf_s']:.3f} s/step), "
          f"{r['speedup']:.2f}x; every call: {r['all_s']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
