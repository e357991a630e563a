"""The Grow sampler: N samples per prompt, greedy decoding and teacher-forced scoring, jitted once.

``Sampler`` is the orchestrator-level object. Each of its functions is one ``jax.jit`` with
explicit in/out shardings from the Layout (sampling rules: weights unsplit over fsdp), built
once per padded input shape and cached. Inside, ``nnx.merge`` rebuilds the model, ``prefill``
encodes each prompt once and builds the cache of its N sample rows (row ``b * N + n`` is prompt
b, sample n): the prompt's part of the cache (encoder output keys/values, the decoder-only
prompt's keys/values) is stored once per prompt and read by its N rows
(``rest_jax.models.attention``); ``rest_jax.grow.decoding.decode`` runs the loop.

Randomness comes only from (seed, grow step, example id, sample index), and batch padding rows
are inactive, so samples do not depend on the batch size, the padding or the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rest_jax.grow import memory
from rest_jax.grow.base import SampleOutput
from rest_jax.config import SamplingConfig
from rest_jax.grow.decoding import DecodeOutput, decode, greedy_logits, row_keys, sample_logits
from rest_jax.errors import RestJaxError
from rest_jax.models.base import EOS_ID, PAD_ID
from rest_jax.parallel.distributed import global_array, host_array
from rest_jax.parallel.layout import Layout

__all__ = ["DecodeOutput", "SampleOutput", "Sampler", "decode", "greedy_logits",
           "place_params", "row_keys", "sample_logits"]


def place_params(params_state: Any, layout: Layout, *, sampling: bool) -> Any:
  """Puts an ``nnx.State`` on its Layout shardings (the sampling or the training variant)."""
  return jax.device_put(params_state, layout.state_shardings(params_state, sampling=sampling))


def _check_rows(name: str, x: np.ndarray, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim or x.shape[0] == 0:
    raise RestJaxError(f"Sampler: {name} must be a non-empty rank-{ndim} array "
                       f"(batch first), got shape {x.shape}.")
  return x


class Sampler:
  """Samples, greedy-decodes and scores a model given by ``graphdef`` and a params state.

  The model-backed implementation of the ``rest_jax.grow.base.Sampler`` protocol.

  Args:
    graphdef: from ``nnx.split(model)``; the model implements ``SequenceModel``.
    layout: the mesh and rules; params use the sampling rules.
    num_samples: N samples per prompt in ``generate``.
    max_decode_len: the most generated tokens (EOS included).
    temperature, top_k, top_p: the sampling distribution (see ``decoding.sample_logits``).
    batch_size: optional fixed number of prompts per call: smaller batches are padded up to
      it, so the last, short batch of a dataset does not compile again.
    eos_id: the token that ends a sample.
    memory_bytes: device memory (per device) ``generate`` may plan for; None reads the
      devices' ``memory_stats()`` (no limit where they report none, e.g. on CPU). A batch
      whose N samples' KV caches do not fit is split into calls that do (same samples);
      when one prompt does not fit, ``generate`` raises a RestJaxError with the numbers.
    cache_segment: decode in segments whose KV cache holds ``cache_segment``, then twice,
      four times ... as many tokens (up to ``max_decode_len``), so a step attends to at most
      twice the tokens generated so far; None decodes on the full-length cache throughout.
    param_dtype: "" samples with the params as given; "bfloat16" casts the floating params
      once, when they are placed (half the weight memory of float32 master weights; matmuls of
      a bfloat16 model read bfloat16 weights anyway). Logits and log-probs stay float32.
    share_prompt_cache: True stores each prompt's cache once for its N samples; False copies
      it into every row (the layout before prompt sharing; for comparison: same samples).
  """

  def __init__(self, graphdef: Any, layout: Layout, *, num_samples: int, max_decode_len: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               batch_size: int | None = None, eos_id: int = EOS_ID,
               memory_bytes: int | None = None, cache_segment: int | None = 32,
               param_dtype: str = "", share_prompt_cache: bool = True):
    # Validates exactly as the config does (one place for the rules and messages).
    SamplingConfig(num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                   max_decode_len=max_decode_len, batch_size=batch_size or 1)
    self.graphdef = graphdef
    self.layout = layout
    self.num_samples = num_samples
    self.max_decode_len = max_decode_len
    self.temperature = float(temperature)
    self.top_k = int(top_k)
    self.top_p = float(top_p)
    self.batch_size = batch_size
    self.eos_id = eos_id
    self.memory_bytes = memory_bytes
    if cache_segment is not None and cache_segment < 2:
      raise RestJaxError(f"Sampler: cache_segment must be >= 2 (or None), got {cache_segment}.")
    self.cache_segment = cache_segment
    self.param_dtype = jnp.dtype(param_dtype) if param_dtype else None
    self.share_prompt_cache = share_prompt_cache
    self._plans: dict[tuple, memory.MemoryPlan] = {}
    self._compiled: dict[tuple, Callable] = {}
    self._param_shardings: tuple[Any, Any] | None = None

  @classmethod
  def from_config(cls, graphdef: Any, layout: Layout, config: SamplingConfig) -> Sampler:
    """A Sampler with the distribution, N, length and batch size of a ``SamplingConfig``."""
    return cls(graphdef, layout, num_samples=config.num_samples,
               max_decode_len=config.max_decode_len, temperature=config.temperature,
               top_k=config.top_k, top_p=config.top_p, batch_size=config.batch_size,
               param_dtype=config.param_dtype)

  # -- placement -------------------------------------------------------------------------------

  def param_shardings(self, params_state: Any) -> Any:
    """Sampling-rule shardings of a params state (computed once per tree structure)."""
    treedef = jax.tree.structure(params_state)
    if self._param_shardings is None or self._param_shardings[0] != treedef:
      self._param_shardings = (treedef,
                               self.layout.state_shardings(params_state, sampling=True))
    return self._param_shardings[1]

  def _dtype(self, x: Any) -> Any:
    """The dtype a params leaf is sampled with (``param_dtype`` for floating leaves)."""
    if self.param_dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
      return x.dtype
    return self.param_dtype

  def place_params(self, params_state: Any) -> Any:
    """Puts params on the sampling shardings in the sampling dtype (a no-op for arrays already
    placed so)."""
    shardings = self.param_shardings(params_state)
    if all(x.dtype == self._dtype(x) for x in jax.tree.leaves(params_state)):
      return jax.device_put(params_state, shardings)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(self._dtype(x)), tree)
    return jax.jit(cast, out_shardings=shardings)(params_state)

  def sampling_abstract(self, params_state: Any) -> Any:
    """``params_state`` as sharded ``jax.ShapeDtypeStruct``s in the sampling dtype."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, self._dtype(x), sharding=s),
                        params_state, self.param_shardings(params_state))

  def memory_plan(self, params_state: Any, input_len: int, batch: int, *,
                  available: int | None = None) -> memory.MemoryPlan:
    """The memory plan of a ``generate`` call on ``batch`` (padded) prompts of ``input_len``.

    ``available``: bytes per device (default: ``memory_bytes``, else the devices' own)."""
    key = (input_len, batch)
    if key not in self._plans:
      available = available or self.memory_bytes
      if available is None:
        available = memory.device_memory_bytes(list(self.layout.mesh.devices.flat))
      abstract = self.sampling_abstract(params_state)
      self._plans[key] = memory.plan_sampling(
          self.graphdef, abstract, num_samples=self.num_samples, input_len=input_len,
          max_decode_len=self.max_decode_len, requested_batch=batch,
          available_bytes=available, num_batch_shards=self.layout.num_batch_shards,
          params_bytes=memory.sharded_bytes(abstract, self.param_shardings(params_state)))
    return self._plans[key]

  def _padded_batch(self, batch: int) -> int:
    target = max(batch, self.batch_size or 0)
    shards = self.layout.num_batch_shards
    return -(-target // shards) * shards

  @staticmethod
  def _pad(x: np.ndarray, padded: int) -> np.ndarray:
    """Pads rows with copies of row 0 (real data, so padded rows never produce NaNs)."""
    if x.shape[0] == padded:
      return x
    return np.concatenate([x, np.repeat(x[:1], padded - x.shape[0], axis=0)], axis=0)

  def _batch(self, x: np.ndarray) -> jax.Array:
    return global_array(x, self.layout.batch_sharding(x.shape))

  def _jit(self, key: tuple, fn: Callable, params_state: Any, in_shapes: tuple,
           out_shapes: tuple) -> Callable:
    """jit ``fn(params, *batch_args)`` once per key, batch-sharding every array but params.

    ``in_shapes`` / ``out_shapes``: shapes of the batch-sharded inputs / outputs (a None
    shape means a replicated value).
    """
    if key not in self._compiled:
      shard = lambda s: (self.layout.replicated() if s is None
                         else self.layout.batch_sharding(s))
      self._compiled[key] = jax.jit(
          fn, in_shardings=(self.param_shardings(params_state),) + tuple(map(shard, in_shapes)),
          out_shardings=tuple(map(shard, out_shapes)))
    return self._compiled[key]

  # -- traced pieces ---------------------------------------------------------------------------

  def cache_lengths(self) -> list[int]:
    """The decode-cache length of each decode segment: doubling from ``cache_segment``."""
    lengths = [self.max_decode_len]
    if self.cache_segment:
      lengths = [min(self.cache_segment, self.max_decode_len)]
      while lengths[-1] < self.max_decode_len:
        lengths.append(min(2 * lengths[-1], self.max_decode_len))
    return lengths

  def _prefill(self, params: Any, inputs: jax.Array, repeats: int):
    """Merges the model and prefills once per prompt, for ``repeats`` rows per prompt.

    The cache is built for the first decode segment; ``extend`` grows it (zero slots at the
    end of every leaf whose length depends on ``max_decode_len``) for the next ones.
    """
    model = nnx.merge(self.graphdef, params)
    prefill = lambda m: model.prefill(inputs, m, repeats=repeats)
    logits, cache = prefill(self.cache_lengths()[0])
    if repeats > 1 and not self.share_prompt_cache:
      prompts = inputs.shape[0]
      cache = jax.tree.map(
          lambda x: jnp.repeat(x, repeats, axis=0) if x.shape[0] == prompts else x, cache)
    logits = jax.lax.with_sharding_constraint(
        logits, self.layout.sharding(("batch", None), logits.shape, sampling=True))
    constrain = lambda c: jax.lax.with_sharding_constraint(
        c, self.layout.tree_shardings(c, model.cache_logical_axes(c), sampling=True))

    def step_fn(tokens, cache, index):
      logits, cache = model.decode_step(tokens, cache, index)
      return logits, constrain(cache)

    one, two = (jax.eval_shape(lambda m=m: prefill(m)[1]) for m in (1, 2))
    grows = jax.tree.map(lambda a, b: a.shape != b.shape, one, two)

    def extend(cache, old, new):
      pad = lambda x: jnp.pad(x, [(0, 0), (0, new - old)] + [(0, 0)] * (x.ndim - 2))
      return constrain(jax.tree.map(lambda g, x: pad(x) if g else x, grows, cache))

    return step_fn, logits, constrain(cache), extend

  def _decode(self, params, inputs, active, keys, *, repeats: int, greedy: bool):
    step_fn, logits, cache, extend = self._prefill(params, inputs, repeats)
    return decode(step_fn, logits, cache, keys, max_decode_len=self.max_decode_len,
                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                  greedy=greedy, eos_id=self.eos_id, active=jnp.repeat(active, repeats),
                  cache_lengths=self.cache_lengths(), extend_cache=extend)

  def _generate_jit(self, params_state: Any, padded: int, input_len: int) -> Callable:
    """The jitted N-samples decode for ``padded`` prompts of ``input_len`` tokens."""
    n, length = self.num_samples, self.max_decode_len
    rows = padded * n

    def fn(params, inputs, active, key_data):
      keys = jax.random.wrap_key_data(key_data)
      return tuple(self._decode(params, inputs, active, keys, repeats=n, greedy=False))

    return self._jit(("generate", padded, input_len), fn, params_state,
                     ((padded, input_len), (padded,), (rows, 2)),
                     ((rows, length), (rows, length), (rows,), None))

  def lowerable_generate(self, params_state: Any, *, batch: int,
                         input_len: int) -> tuple[Callable, tuple]:
    """The jitted function ``generate`` runs, and abstract arguments to ``.lower()`` it with.

    For ahead-of-time compilation (``rest_jax.parallel.compile_check``): nothing is allocated.

    Args:
      params_state: the params ``nnx.State`` (concrete or ``jax.ShapeDtypeStruct`` leaves).
      batch: prompts per call (padded up like ``generate`` does).
      input_len: prompt length.
    Returns:
      (jitted fn, args): params, inputs int32 `[padded, input_len]`, active bool `[padded]`,
      key data uint32 `[padded * num_samples, 2]`, each a sharded ``jax.ShapeDtypeStruct``.
    """
    padded = self._padded_batch(batch)
    rows = padded * self.num_samples
    abstract = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=self.layout.batch_sharding(shape))
    params = self.sampling_abstract(params_state)
    return self._generate_jit(params_state, padded, input_len), (
        params, abstract((padded, input_len), jnp.int32), abstract((padded,), jnp.bool_),
        abstract((rows, 2), jnp.uint32))

  # -- public API ------------------------------------------------------------------------------

  def generate(self, params_state: Any, inputs: np.ndarray, example_ids: np.ndarray, *,
               seed: int, grow_step: int, first_sample: int = 0) -> SampleOutput:
    """N samples per prompt (sample indices ``first_sample`` and up); each prompt is encoded
    once.

    Args:
      params_state: the policy's ``nnx.State``. Place it once with ``place_params`` before a
        loop of calls; a state on other shardings is copied onto the sampling ones each call.
      inputs: int32 `[batch, input_len]`, right-padded prompts (the global batch; every
        process passes the same array).
      example_ids: int64 `[batch]`, stable ids in [0, 2**32) that seed each prompt's samples.
      seed: the run's seed.
      grow_step: the Grow step; with seed, example id and sample index it fixes the samples.
      first_sample: the sample index of each prompt's first row (>= 0).
    Returns:
      SampleOutput with rows ``[batch * num_samples]``, row b * N + n = prompt b, sample
      first_sample + n.
    """
    inputs = _check_rows("inputs", inputs, 2).astype(np.int32)
    example_ids = _check_rows("example_ids", example_ids, 1).astype(np.int64)
    if example_ids.shape[0] != inputs.shape[0]:
      raise RestJaxError(f"Sampler.generate: {example_ids.shape[0]} example_ids for "
                         f"{inputs.shape[0]} prompts; pass one id per prompt.")
    if first_sample < 0:
      raise RestJaxError(f"Sampler.generate: first_sample must be >= 0, got {first_sample}.")
    if example_ids.min() < 0 or example_ids.max() >= 2**32:
      raise RestJaxError("Sampler.generate: example ids must lie in [0, 2**32) (they seed the "
                         "samples); renumber the examples, e.g. by their index in the dataset.")
    padded = self._padded_batch(inputs.shape[0])
    per_call = self.memory_plan(params_state, inputs.shape[1], padded).batch_size
    if per_call >= padded:
      return self._generate(params_state, inputs, example_ids, padded, seed=seed,
                            grow_step=grow_step, first_sample=first_sample)
    parts = [self._generate(params_state, inputs[i:i + per_call], example_ids[i:i + per_call],
                            per_call, seed=seed, grow_step=grow_step, first_sample=first_sample)
             for i in range(0, inputs.shape[0], per_call)]
    return SampleOutput(*(np.concatenate([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(SampleOutput) if f.name != "num_steps"),
                        num_steps=max(p.num_steps for p in parts))

  def _generate(self, params_state: Any, inputs: np.ndarray, example_ids: np.ndarray,
                padded: int, *, seed: int, grow_step: int,
                first_sample: int = 0) -> SampleOutput:
    """``generate`` of at most ``padded`` prompts in one jitted call."""
    batch, n = inputs.shape[0], self.num_samples
    compiled = self._generate_jit(params_state, padded, inputs.shape[1])
    indices = np.arange(first_sample, first_sample + n)
    keys = row_keys(seed, grow_step, np.repeat(self._pad(example_ids, padded), n),
                    np.tile(indices, padded))
    out = DecodeOutput(*compiled(
        self.place_params(params_state), self._batch(self._pad(inputs, padded)),
        self._batch(np.arange(padded) < batch),
        self._batch(np.asarray(jax.random.key_data(keys)))))
    keep = batch * n
    return SampleOutput(tokens=host_array(out.tokens)[:keep],
                        logprobs=host_array(out.logprobs)[:keep],
                        lengths=host_array(out.lengths)[:keep],
                        example_ids=np.repeat(example_ids, n),
                        sample_idx=np.tile(indices.astype(np.int32), batch),
                        num_steps=int(host_array(out.num_steps)))

  def greedy(self, params_state: Any, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding for evaluation.

    Args:
      params_state: the policy's ``nnx.State``.
      inputs: int32 `[batch, input_len]`, right-padded prompts.
    Returns:
      tokens int32 `[batch, max_decode_len]` (0 after EOS) and lengths int32 `[batch]`.
    """
    inputs = _check_rows("inputs", inputs, 2).astype(np.int32)
    batch = inputs.shape[0]
    padded = self._padded_batch(batch)

    def fn(params, inputs, active):
      out = self._decode(params, inputs, active, None, repeats=1, greedy=True)
      return out.tokens, out.lengths

    compiled = self._jit(("greedy", padded, inputs.shape[1]), fn, params_state,
                         ((padded, inputs.shape[1]), (padded,)),
                         ((padded, self.max_decode_len), (padded,)))
    tokens, lengths = compiled(self.place_params(params_state),
                               self._batch(self._pad(inputs, padded)),
                               self._batch(np.arange(padded) < batch))
    return host_array(tokens)[:batch], host_array(lengths)[:batch]

  def score(self, params_state: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Teacher-forced per-token log-probs under the model (temperature 1, no top-k/top-p).

    Used to record behaviour log-probs of the original (x, y) pairs.

    Args:
      params_state: the policy's ``nnx.State``.
      inputs: int32 `[batch, input_len]`, right-padded prompts.
      targets: int32 `[batch, target_len]`, right-padded targets.
    Returns:
      float32 `[batch, target_len]`: log p(targets[:, t] | inputs, targets[:, :t]), 0 where
      the target is padding.
    """
    inputs = _check_rows("inputs", inputs, 2).astype(np.int32)
    targets = _check_rows("targets", targets, 2).astype(np.int32)
    if targets.shape[0] != inputs.shape[0]:
      raise RestJaxError(f"Sampler.score: {targets.shape[0]} targets for {inputs.shape[0]} "
                         "inputs; pass one target per prompt.")
    batch = inputs.shape[0]
    padded = self._padded_batch(batch)

    def fn(params, inputs, targets):
      model = nnx.merge(self.graphdef, params)
      logprobs = jax.nn.log_softmax(model(inputs, targets).astype(jnp.float32))
      token_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
      return (jnp.where(targets == PAD_ID, 0.0, token_logprobs),)

    compiled = self._jit(("score", padded, inputs.shape[1], targets.shape[1]), fn,
                         params_state, ((padded, inputs.shape[1]), (padded, targets.shape[1])),
                         ((padded, targets.shape[1]),))
    (logprobs,) = compiled(self.place_params(params_state),
                           self._batch(self._pad(inputs, padded)),
                           self._batch(self._pad(targets, padded)))
    return host_array(logprobs)[:batch]
