"""Pure decoding: per-row sampling (temperature, top-k, top-p), greedy, and the decode loop.

Everything here is traced code with no side effects and no shardings (style of t5x
``decoding.temperature_sample`` and flax ``examples/lm1b/temperature_sampler.py``): the model
enters as a ``step_fn`` callable, randomness as one PRNG key per row. A row's tokens depend
only on its own logits and key, never on the other rows, so results do not change with the
batch size or the mesh. ``rest_jax.grow.sampler.Sampler`` jits these with the Layout shardings.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rest_jax.models.base import EOS_ID

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class DecodeOutput(NamedTuple):
  """What ``decode`` returns (all jax arrays).

  tokens: int32 `[batch, max_decode_len]`, 0 after EOS.
  logprobs: float32 `[batch, max_decode_len]`, the behaviour policy's log-prob of each token
    (0 after EOS).
  lengths: int32 `[batch]`, tokens including EOS (``max_decode_len`` if no EOS; 0 for
    inactive rows).
  num_steps: int32 scalar, how many times ``step_fn`` ran (the loop exits early once every
    row has emitted EOS).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  num_steps: jax.Array


def _top_p_unsorted(logits: jax.Array, top_p: float) -> jax.Array:
  """Top-p over a whole row without sorting it: `[vocab]` logits, -inf where removed.

  The same set as keeping, in the stable order of decreasing probability, each token whose
  mass strictly before it is < top_p: the cut-off probability tau is the smallest p with
  mass(> p) < top_p, found by bisecting on the bits of non-negative float32 values (31
  passes over the row, where XLA:CPU's sort of 32k entries cost seconds per step); of the
  tokens equal to tau, the lower ids come first.
  """
  probs = jax.nn.softmax(logits)
  above = lambda x: jnp.sum(jnp.where(probs > x, probs, 0.0))
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    small_enough = above(as_float(mid)) < top_p
    return jnp.where(small_enough, lo, mid + 1), jnp.where(small_enough, mid, hi)

  hi = jax.lax.bitcast_convert_type(jnp.max(probs), jnp.int32)
  _, cut = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), hi))
  tau = jnp.min(jnp.where(probs >= as_float(cut), probs, jnp.inf))
  ties = probs == tau
  before = above(tau) + tau * (jnp.cumsum(ties) - 1)  # Mass before each tied token.
  keep = (probs > tau) | (ties & (before < top_p))
  return jnp.where(keep, logits, -jnp.inf)


def _candidates(logits: jax.Array, *, temperature: float, top_k: int,
                top_p: float) -> tuple[jax.Array, jax.Array | None]:
  """The tokens a row may sample and their tempered, filtered logits.

  Args:
    logits: one row `[vocab]`.
  Returns:
    (logits `[c]` float32, -inf where removed; token ids `[c]` int32, or None when the
    candidates are the whole vocabulary in order). With top-k the candidates are the k most
    likely, sorted by decreasing logit (``lax.top_k``), else the whole row.
  """
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    logits, ids = jax.lax.top_k(logits, top_k)
    if top_p < 1.0:
      probs = jax.nn.softmax(logits)
      # Keep a token while the mass strictly before it is < top_p: the smallest prefix whose
      # mass reaches top_p, and always the top token (mass before it is 0 < top_p).
      logits = jnp.where((jnp.cumsum(probs) - probs) < top_p, logits, -jnp.inf)
    return logits, ids.astype(jnp.int32)
  if top_p < 1.0:
    logits = _top_p_unsorted(logits, top_p)
  return logits, None


def _first_hit(cdf: jax.Array, probs: jax.Array, v: jax.Array) -> jax.Array:
  """The first i with cdf[i] > v and probs[i] > 0 (zero-mass entries are never drawn); the
  most likely entry when none is (only through rounding in the last place)."""
  hit = (cdf > v) & (probs > 0)
  return jnp.where(jnp.any(hit), jnp.argmax(hit), jnp.argmax(probs)).astype(jnp.int32)


def inverse_cdf(probs: jax.Array, u: jax.Array, *, block: int = 128) -> jax.Array:
  """The first index whose cumulative probability exceeds ``u`` x the total mass.

  Two levels, so no cumulative sum runs over the whole vocabulary (XLA:CPU's cumsum of 32k
  entries cost as much as the rest of the step): pick the block of ``block`` entries by the
  cumulative sum of the block sums, then the entry inside it.

  Args:
    probs: `[c]` non-negative (need not sum to 1).
    u: float32 scalar in [0, 1).
  Returns:
    int32 scalar index i with probs[i] > 0, drawn with probability probs[i] / sum(probs).
  """
  c = probs.shape[0]
  if c <= 2 * block:
    cdf = jnp.cumsum(probs)
    return _first_hit(cdf, probs, u * cdf[-1])
  blocks = jnp.pad(probs, (0, -c % block)).reshape(-1, block)
  sums = blocks.sum(axis=1)
  cdf = jnp.cumsum(sums)
  j = _first_hit(cdf, sums, u * cdf[-1])
  inner = blocks[j]
  i = _first_hit(jnp.cumsum(inner), inner, u * cdf[-1] - (cdf[j] - sums[j]))
  return j * block + i


def sample_logits(logits: jax.Array, keys: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row, each row with its own key and one uniform number.

  The token is the inverse CDF of the filtered, normalised probabilities at one uniform draw
  of the row's key (``jax.random.categorical`` would draw a Gumbel number per vocabulary entry,
  which dominated CPU decode steps). With top-k the CDF runs over the k candidates only.

  Args:
    logits: `[batch, vocab]` (any float dtype; computed in float32).
    keys: `[batch]` PRNG keys (typed keys, or raw `[batch, 2]` uint32 keys).
    temperature: > 0; logits are divided by it first.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (1.0 = off); the top token is always kept.
  Returns:
    tokens int32 `[batch]` and float32 `[batch]` log-probabilities of those tokens under the
    distribution actually sampled from (after temperature, top-k and top-p): the behaviour
    policy's log-prob.
  """

  def one(row: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    filtered, ids = _candidates(row, temperature=temperature, top_k=top_k, top_p=top_p)
    log_probs = jax.nn.log_softmax(filtered)
    index = inverse_cdf(jnp.exp(log_probs), jax.random.uniform(key, (), jnp.float32))
    token = index if ids is None else ids[index]
    return token.astype(jnp.int32), log_probs[index]

  return jax.vmap(one)(logits, keys)


def greedy_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Argmax tokens int32 `[batch]` and their model log-probs (temperature 1) `[batch]`."""
  logits = logits.astype(jnp.float32)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs


def fold_row_keys(base_key: jax.Array, example_ids: jax.Array,
                  sample_idx: jax.Array) -> jax.Array:
  """Per-row keys `[batch]`: fold_in(fold_in(base_key, example_id), sample_idx).

  Args:
    base_key: one typed PRNG key (already folded with the seed and the Grow step).
    example_ids: uint32/int32 `[batch]`.
    sample_idx: int32 `[batch]`.
  """
  return jax.vmap(lambda e, s: jax.random.fold_in(jax.random.fold_in(base_key, e), s))(
      example_ids, sample_idx)


_fold_row_keys_jit = jax.jit(fold_row_keys)


def row_keys(seed: int, grow_step: int, example_ids: Any, sample_idx: Any) -> jax.Array:
  """The sampling key of every row: a function of (seed, grow step, example id, sample index).

  key = fold_in(fold_in(fold_in(PRNGKey(seed), grow_step), example_id), sample_idx), so the
  same config gives the same samples whatever the batch size, mesh or number of hosts.

  Args:
    seed: the run's seed.
    grow_step: the Grow step (0-based).
    example_ids: `[batch]` integers in [0, 2**32).
    sample_idx: `[batch]` integers, the sample index n in [0, num_samples).
  Returns:
    typed PRNG keys `[batch]`.
  """
  if not isinstance(example_ids, jax.Array):
    example_ids = np.asarray(example_ids).astype(np.uint32)
  base = jax.random.fold_in(jax.random.key(seed), grow_step)
  return _fold_row_keys_jit(base, jnp.asarray(example_ids, jnp.uint32),
                            jnp.asarray(sample_idx, jnp.int32))


def decode(step_fn: StepFn, first_logits: jax.Array, cache: Any, row_keys: jax.Array | None,
           *, max_decode_len: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, eos_id: int = EOS_ID,
           active: jax.Array | None = None, cache_lengths: Sequence[int] = (),
           extend_cache: Callable[[Any, int, int], Any] | None = None) -> DecodeOutput:
  """Decodes every row until it emits EOS or reaches max_decode_len (while_loops).

  The loop stops as soon as every row is finished. At position t, row b samples with the key
  ``fold_in(row_keys[b], t)``; greedy takes the argmax and records the model's log_softmax
  (temperature 1) of it.

  Args:
    step_fn: ``(tokens [batch] int32, cache, index int32 scalar) -> (logits [batch, vocab],
      cache)``, the model's ``decode_step``: logits for position index + 1.
    first_logits: `[batch, vocab]` logits for position 0 (from ``prefill``).
    cache: the decode cache from ``prefill`` (carried through the loop).
    row_keys: `[batch]` PRNG keys (see ``row_keys``); ignored (may be None) when greedy.
    max_decode_len: the most tokens per row, L.
    temperature, top_k, top_p: see ``sample_logits`` (ignored when greedy).
    greedy: argmax decoding.
    eos_id: the token that ends a row.
    active: optional bool `[batch]`; inactive rows (batch padding) are finished from the
      start: all-zero tokens, length 0, and they never keep the loop running.
    cache_lengths: increasing ``max_decode_len`` values the cache is built for, segment by
      segment (empty: one segment). ``cache`` must come from ``prefill(inputs,
      cache_lengths[0])``; positions ``t < cache_lengths[j]`` run on the cache of segment j,
      so attention reads at most twice the filled part of the cache (for doubling lengths)
      instead of all ``max_decode_len`` slots at every step: cost linear in the length.
    extend_cache: ``(cache, old_length, new_length) -> cache`` grows a cache built for
      ``old_length`` decoded tokens to ``new_length`` (needed with ``cache_lengths``).
  Returns:
    DecodeOutput: tokens int32 `[batch, L]`, logprobs float32 `[batch, L]`, lengths int32
    `[batch]`, num_steps int32 scalar.
  """
  batch = first_logits.shape[0]
  length = max_decode_len

  def choose(logits, t, done):
    if greedy:
      tokens, logprobs = greedy_logits(logits)
    else:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
      tokens, logprobs = sample_logits(logits, keys, temperature=temperature, top_k=top_k,
                                       top_p=top_p)
    return jnp.where(done, 0, tokens), jnp.where(done, 0.0, logprobs)

  def emit(state, logits, t):
    tokens_buf, logprobs_buf, lengths, done = state
    tokens, logprobs = choose(logits, t, done)
    tokens_buf = jax.lax.dynamic_update_index_in_dim(tokens_buf, tokens, t, axis=1)
    logprobs_buf = jax.lax.dynamic_update_index_in_dim(logprobs_buf, logprobs, t, axis=1)
    lengths = jnp.where(done, lengths, t + 1)
    done = done | (tokens == eos_id)
    return tokens, (tokens_buf, logprobs_buf, lengths, done)

  done = jnp.zeros((batch,), bool) if active is None else ~active.astype(bool)
  state = (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.float32),
           jnp.zeros((batch,), jnp.int32), done)
  last, state = emit(state, first_logits, jnp.int32(0))

  def body(carry):
    t, last, cache, state = carry
    logits, cache = step_fn(last, cache, t - 1)
    last, state = emit(state, logits, t)
    return t + 1, last, cache, state

  # A cache built for M decoded tokens serves decode positions t < M (both model families).
  ends = [m for m in sorted(set(cache_lengths)) if 1 < m < length] + [length]
  carry = (jnp.int32(1), last, cache, state)
  for j, end in enumerate(ends):
    if j:
      t, last, cache, state = carry
      carry = (t, last, extend_cache(cache, ends[j - 1], end), state)
    carry = jax.lax.while_loop(
        lambda c, end=end: (c[0] < end) & ~jnp.all(c[3][3]), body, carry)
  t, _, _, (tokens, logprobs, lengths, _) = carry
  return DecodeOutput(tokens, logprobs, lengths, t - 1)
