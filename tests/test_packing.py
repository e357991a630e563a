"""Sequence packing: packed rows give every example the logits, pre-pass outputs and losses of
the unpacked batch (both model families, every loss), nothing leaks across segments, and the
packing does not depend on the host count."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.config import TrainConfig
from rest_jax.improve import losses, packing, value
from rest_jax.improve.extras import build_extras
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.models import build_model, get_preset
from conftest import mesh_layout

FAMILIES = ("tiny", "tiny_decoder")
INPUT_LEN, TARGET_LEN, BATCH = 12, 10, 8


def _batch(seed: int = 0, *, empty_prompt: bool = False) -> dict[str, np.ndarray]:
  """Right-padded examples of varied lengths (one prompt empty when ``empty_prompt``)."""
  rng = np.random.default_rng(seed)
  inputs = np.zeros((BATCH, INPUT_LEN), np.int32)
  targets = np.zeros((BATCH, TARGET_LEN), np.int32)
  for i in range(BATCH):
    a = 0 if (empty_prompt and i == 5) else int(rng.integers(1, 7))
    b = int(rng.integers(1, 6))
    inputs[i, :a] = rng.integers(2, 200, a)
    targets[i, :b] = rng.integers(2, 200, b)
    targets[i, b - 1] = 1
  return {"inputs": inputs, "targets": targets,
          "reward": rng.uniform(size=BATCH).astype(np.float32),
          "behaviour_logprobs": (-rng.uniform(0.1, 3.0, size=targets.shape)
                                 * (targets != 0)).astype(np.float32),
          "is_original": np.zeros(BATCH, np.int32)}


def _device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_pack_batch_segments_positions_and_host_count():
  batch = _batch(1)
  packed = packing.pack_batch(batch, groups=2)
  rows = len(packed["packed_inputs"])
  assert rows % 2 == 0 and rows < BATCH  # Fewer rows than examples, whole groups.
  group = BATCH // 2
  for e in range(BATCH):
    r = (e // group) * (rows // 2) + packed["packed_row"][e]
    seg = packed["packed_targets_segment_ids"][r]
    start = packed["packed_offset"][e]
    n = int((batch["targets"][e] != 0).sum())
    np.testing.assert_array_equal(packed["packed_targets"][r, start:start + n],
                                  batch["targets"][e, :n])
    np.testing.assert_array_equal(packed["packed_targets_positions"][r, start:start + n],
                                  np.arange(n))
    assert len(set(seg[start:start + n].tolist())) == 1 and seg[start] > 0
    # The same segment id marks the example's prompt in the same row.
    m = int((batch["inputs"][e] != 0).sum())
    cols = np.flatnonzero(packed["packed_inputs_segment_ids"][r] == seg[start])
    np.testing.assert_array_equal(packed["packed_inputs"][r, cols], batch["inputs"][e, :m])
    np.testing.assert_array_equal(packed["packed_inputs_positions"][r, cols], np.arange(m))
  assert packing.fill(packed)["packed"] > packing.fill(packed)["unpacked"]
  # Rows that would hold more token columns than the batch: it runs unpacked.
  full = dict(batch, inputs=np.full_like(batch["inputs"], 5),
              targets=np.full_like(batch["targets"], 5))  # 3 per row: 2 rows x 3 > 4 examples.
  assert "packed_targets" not in packing.pack_batch(full, groups=2, scale=3)
  longer = packing.pack_batch(batch, groups=2, scale=3)
  assert longer["packed_targets"].shape == (2, 3 * TARGET_LEN)  # One row per group here.
  assert packing.fill(longer)["packed"] > packing.fill(longer)["unpacked"]
  # Two hosts, each packing its own group, agreeing on the row count: the same rows.
  halves = [packing.pack_batch({k: v[h * group:(h + 1) * group] for k, v in batch.items()},
                               groups=1, agree=lambda r: rows // 2) for h in range(2)]
  for key in packing.PACKED_KEYS:
    np.testing.assert_array_equal(packed[key], np.concatenate([h[key] for h in halves]))


def test_rows_are_rounded_to_few_shapes():
  assert [packing.rows_per_group(n, 64) for n in (1, 8, 9, 63, 64)] == [8, 8, 16, 64, 64]
  assert packing.rows_per_group(3, 4) == 3


def _config(name):
  """One layer per stack (compile time)."""
  layers = dict(num_encoder_layers=1) if name == "tiny" else {}
  return get_preset(name, num_decoder_layers=1, **layers)


def _model(name):
  return build_model(_config(name), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_logits_equal_unpacked_and_stay_in_their_segment(name):
  model = _model(name)
  batch = _batch(2, empty_prompt=name == "tiny_decoder")  # T5 masks every key of an empty prompt.
  scale = 2 if name == "tiny" else 1  # Rows twice as long for one family.
  packed = _device(packing.pack_batch(batch, groups=2, scale=scale))
  assert len(packed["packed_targets"]) < BATCH
  forward = jax.jit(lambda b: packing.teacher_forced(model, b, groups=2))
  got = np.asarray(forward(packed))
  want = np.asarray(forward(_device(batch)))
  real = (batch["targets"] != 0)[..., None]
  np.testing.assert_allclose(got * real, want * real, atol=1e-5)
  # Other tokens (same lengths, same rows) for example 0: no other example's logits move.
  changed = dict(batch)
  for key in ("inputs", "targets"):
    changed[key] = batch[key].copy()
    n = int((batch[key][0] != 0).sum()) - (key == "targets")
    changed[key][0, :n] = (batch[key][0, :n] + 7) % 200 + 2
  again = np.asarray(forward(_device(packing.pack_batch(changed, groups=2, scale=scale))))
  assert not np.allclose(again[0] * real[0], got[0] * real[0])
  np.testing.assert_array_equal(again[1:] * real[1:], got[1:] * real[1:])


def _losses() -> dict[str, losses.Loss]:
  cfg = TrainConfig(num_steps=10)
  out = {name: losses.make_loss(dataclasses.replace(cfg, loss=name))
         for name in ("bc", "reward_weighted_bc", "gold", "bvmpo", "oac", "raft_pp")}
  seq = dataclasses.replace(cfg, raft_pp=dataclasses.replace(cfg.raft_pp, ratio="sequence"))
  out["raft_pp_sequence"] = losses.make_loss(dataclasses.replace(seq, loss="raft_pp"))
  return out


@pytest.mark.parametrize("name", FAMILIES)
def test_every_loss_of_a_packed_batch_equals_the_unpacked_loss(name):
  layout = mesh_layout(2, devices=jax.devices()[:2])
  graphdef, params = nnx.split(_model(name))
  net = value.ValueNet(_config(name), layout, seed=1)
  needs = frozenset({losses.NEEDS_BC_LOGPROBS, losses.NEEDS_START_LOGPROBS, losses.NEEDS_VALUES})
  extras = build_extras(needs, layout=layout, policy_graphdef=graphdef, bc_params=params,
                        start_params=params, value_net=net, value_params=net.init(),
                        discount=0.9)
  batch = _batch(3, empty_prompt=name == "tiny_decoder")
  table = _losses()

  @jax.jit
  def all_losses(batch):
    batch = {**batch, **extras(batch), "step": jnp.int32(3)}
    logits = packing.teacher_forced(nnx.merge(graphdef, params), batch, groups=2)
    out = {}
    for key, loss in table.items():
      loss_params = loss.init_params() if loss.init_params else {}
      out[key] = loss.fn(logits, batch, loss_params)[1]
    return out

  scale = 2 if name == "tiny_decoder" else 1
  got = all_losses(_device(packing.pack_batch(batch, groups=2, scale=scale)))
  want = all_losses(_device(batch))
  for key in table:
    for metric in want[key]:
      np.testing.assert_allclose(got[key][metric], want[key][metric], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{key} {metric}")


@pytest.mark.parametrize("name", [pytest.param("tiny", marks=pytest.mark.slow), "tiny_decoder"])
def test_packed_train_step_equals_unpacked(name):
  """The Trainer packs the host batch itself; the sharded step gives the unpacked numbers."""
  layout = mesh_layout(2, 2, 1, devices=jax.devices()[:4])
  graphdef, params = nnx.split(_model(name))
  cfg = TrainConfig(loss="raft_pp", num_steps=10, learning_rate=1e-2)
  results = []
  for on in (False, True):
    trainer = Trainer(graphdef, layout, losses.make_loss(cfg), make_optimizer(cfg), packing=on)
    state, metrics = trainer.train_step(trainer.init(params), _batch(4))
    results.append((jax.device_get(nnx.to_pure_dict(state.params)), jax.device_get(metrics)))
  (p0, m0), (p1, m1) = results
  for key in m0:
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Adam's first step is about lr * sign(grad): near-zero gradients may flip by rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p0, p1)
