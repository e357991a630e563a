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


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=32128)
  args = parser.parse_args(argv)
  print("| rows | vocab | options | categorical s | inverse CDF s | speedup |\n|---|---|---|---|---|---|")
  for r in measure(rows=args.rows, vocab=args.vocab):
    options = {k: r[k] for k in ("temperature", "top_k", "top_p") if k in r}
    print(f"| {r['rows']} | {r['vocab']} | {options} | {r['categorical_s']:.4f} | "
          f"{r['inverse_cdf_s']:.4f} | {r['speedup']:.1f}x |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
