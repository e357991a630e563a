"""The sampler's memory plan: how many prompts per call fit in device memory.

A Grow call holds the weights once and, per prompt, its decode cache: the prompt's part once
(encoder output keys/values, or the decoder-only prompt's keys/values) and the KV cache of the
longest sample N times, the output buffers and the per-row sampling work space (float32 logits
over the vocabulary, a few copies). The plan
computes these from the model itself (``jax.eval_shape`` of ``prefill``: no memory, no compute),
picks the largest batch that fits, and fails early, with the numbers, when one prompt does not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.errors import RestJaxError

# Float32 copies of a row's logits alive at once while sampling (logits, tempered/filtered,
# log-softmax, top-p sort): a conservative count.
LOGIT_COPIES = 4


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """What a sampler call needs and what fits (bytes are per device).

  bytes_per_prompt: one prompt's N samples (cache, buffers, sampling work space).
  params_bytes: the weights (replicated for sampling).
  available_bytes: the device memory the plan may use.
  max_prompts: the most prompts per call that fit (a multiple of the batch shards).
  batch_size: the prompts per call to use: min(requested, max_prompts).
  """

  bytes_per_prompt: int
  params_bytes: int
  available_bytes: int | None
  max_prompts: int | None
  batch_size: int


def tree_bytes(tree: Any) -> int:
  """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape"))


def sharded_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of ``tree`` placed on ``shardings`` (a matching tree)."""
  shapes = jax.tree.leaves(tree)
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(shapes, jax.tree.leaves(shardings)))


def cache_bytes_per_prompt(graphdef: Any, params: Any, *, input_len: int, max_decode_len: int,
                           num_samples: int = 1) -> tuple[int, int]:
  """Bytes of one prompt's decode cache for ``num_samples`` rows and the vocabulary size
  (``prefill`` traced on shapes only: no memory, no compute)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  inputs = jax.ShapeDtypeStruct((1, input_len), jnp.int32)
  logits, cache = jax.eval_shape(
      lambda p, x: nnx.merge(graphdef, p).prefill(x, max_decode_len, repeats=num_samples),
      abstract, inputs)
  return tree_bytes(cache), logits.shape[-1]


def device_memory_bytes(devices: Sequence[jax.Device] | None = None) -> int | None:
  """The smallest ``bytes_limit`` of the devices' memory_stats(); None where not reported."""
  limits = []
  for device in devices or jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without memory_stats)
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def plan_sampling(graphdef: Any, params: Any, *, num_samples: int, input_len: int,
                  max_decode_len: int, requested_batch: int,
                  available_bytes: int | None, num_batch_shards: int = 1,
                  safety: float = 0.9, params_bytes: int | None = None) -> MemoryPlan:
  """The prompts per sampler call that fit in ``available_bytes`` of each device.

  Args:
    graphdef, params: the model (``nnx.split``); params may be abstract.
    num_samples: N samples per prompt.
    input_len: the padded prompt length.
    max_decode_len: the longest sample.
    requested_batch: the prompts per call asked for (SamplingConfig.batch_size).
    available_bytes: device memory per device; None (unknown, e.g. CPU) trusts the request.
    num_batch_shards: devices the batch is split over (each holds 1/shards of the rows).
    safety: the fraction of ``available_bytes`` the plan may fill.
    params_bytes: the weights' bytes per device (default: all of ``params``, unsplit).
  Returns:
    the MemoryPlan; ``batch_size`` is the request if it fits, else the largest that does.
  Raises:
    RestJaxError: when not even ``num_batch_shards`` prompts (one per shard) fit.
  """
  cache_bytes, vocab_size = cache_bytes_per_prompt(
      graphdef, params, input_len=input_len, max_decode_len=max_decode_len,
      num_samples=num_samples)
  rows_bytes = (4 * vocab_size * LOGIT_COPIES  # Sampling work space (float32 logits).
                + 2 * 4 * max_decode_len + 16)  # Token / log-prob buffers, length, key.
  per_prompt = cache_bytes + num_samples * rows_bytes + 4 * input_len
  params_bytes = tree_bytes(params) if params_bytes is None else params_bytes
  if available_bytes is None:
    return MemoryPlan(per_prompt, params_bytes, None, None, requested_batch)
  budget = int(available_bytes * safety) - params_bytes
  per_shard = budget // per_prompt if budget > 0 else 0
  if per_shard < 1:
    raise RestJaxError(
        f"Grow sampling does not fit in device memory: one prompt needs {per_prompt:,} bytes "
        f"({cache_bytes:,} bytes of KV cache for {input_len} prompt + {num_samples} x "
        f"{max_decode_len} generated tokens, {num_samples} x {rows_bytes:,} bytes of sampling "
        f"buffers) on top of {params_bytes:,} "
        f"bytes of weights, but {available_bytes:,} bytes are available per device "
        f"({safety:.0%} usable). Lower SamplingConfig.num_samples or max_decode_len, shorten "
        "the prompts, raise MeshConfig.tensor (decoding splits the weights over tensor only), "
        "or use devices with more memory.")
  max_prompts = per_shard * num_batch_shards
  return MemoryPlan(per_prompt, params_bytes, available_bytes, max_prompts,
                    min(requested_batch, max_prompts))
