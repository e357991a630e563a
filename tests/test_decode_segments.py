"""Decoding on a KV cache grown segment by segment gives the samples of the full-length cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rest_jax.models import build_model, get_preset
from rest_jax.grow.sampler import Sampler
from conftest import mesh_layout


def test_cache_lengths_double_up_to_the_max():
  layout = mesh_layout(devices=jax.devices()[:1])
  lengths = lambda **kw: Sampler(None, layout, num_samples=1, **kw).cache_lengths()
  assert lengths(max_decode_len=100, cache_segment=16) == [16, 32, 64, 100]
  assert lengths(max_decode_len=64, cache_segment=16) == [16, 32, 64]
  assert lengths(max_decode_len=8, cache_segment=16) == [8]
  assert lengths(max_decode_len=100, cache_segment=None) == [100]


@pytest.mark.parametrize("preset", ["tiny", "tiny_decoder"])
def test_segmented_cache_gives_the_same_samples(preset):
  graphdef, params = nnx.split(build_model(get_preset(preset), rngs=nnx.Rngs(0)))
  layout = mesh_layout(devices=jax.devices()[:1])
  inputs = np.random.default_rng(0).integers(2, 260, (3, 6)).astype(np.int32)
  inputs[1, 4:] = 0  # A shorter prompt.
  outs = {}
  for segment in (None, 3):
    sampler = Sampler(graphdef, layout, num_samples=2, max_decode_len=11, temperature=1.0,
                      cache_segment=segment)
    assert sampler.cache_lengths() == ([11] if segment is None else [3, 6, 11])
    outs[segment] = (sampler.generate(params, inputs, np.arange(3), seed=0, grow_step=0),
                     sampler.greedy(params, inputs))
  full, segmented = outs[None], outs[3]
  np.testing.assert_array_equal(full[0].tokens, segmented[0].tokens)
  np.testing.assert_array_equal(full[0].lengths, segmented[0].lengths)
  np.testing.assert_allclose(full[0].logprobs, segmented[0].logprobs, atol=1e-5)
  assert full[0].num_steps == segmented[0].num_steps
  np.testing.assert_array_equal(full[1][0], segmented[1][0])
