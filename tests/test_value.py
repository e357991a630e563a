"""The behaviour value network: sharding metadata, Monte-Carlo regression, initialisation from the
policy, the pre-pass (extras) and the checkpoint round trip."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.improve import losses

from rest_jax.improve import value
from rest_jax.config import ValueConfig
from rest_jax.improve.extras import build_extras
from rest_jax.models import build_model, get_preset
from conftest import mesh_layout

CONFIG = get_preset("tiny_decoder", num_decoder_layers=1)


@pytest.fixture(scope="module")
def net():
  return value.ValueNet(CONFIG, mesh_layout(2, 2, 2), seed=0)


def _batch(step: int, size: int = 16):
  """Reward 1 when the prompt starts with an even token: V must read the prompt."""
  rng = np.random.default_rng(step)
  inputs = rng.integers(2, 12, size=(size, 3)).astype(np.int32)
  targets = rng.integers(2, 12, size=(size, 5)).astype(np.int32)
  targets[:, 4] = 1
  targets[::2, 3:] = 0
  targets[::2, 2] = 1
  reward = (inputs[:, 0] % 2 == 0).astype(np.float32)
  return {"inputs": inputs, "targets": targets, "reward": reward}


def test_params_carry_logical_axes_and_are_sharded(net):
  params = net.init()
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(variables) > 10
  for var in variables:
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim
  pure = nnx.to_pure_dict(params)
  assert pure["trunk"]["lm_head"]["kernel"].shape == (CONFIG.d_model, 1)
  embedding = pure["trunk"]["embed"]["embedding"]
  assert embedding.sharding.spec == net.layout.spec(("vocab", "embed"), embedding.shape)
  assert embedding.sharding.spec != jax.sharding.PartitionSpec(None, None)  # Really split.


def test_value_regression_loss_falls(net):
  cfg = ValueConfig(learning_rate=3e-3, num_steps=30, batch_size=16)
  batches = (_batch(step) for step in range(10_000))
  init = net.init()
  params, history = value.train_value(net, init, cfg=cfg, batches=batches)
  assert len(history) == 30
  assert np.mean(history[-5:]) < 0.6 * np.mean(history[:3]), history
  # On a fresh batch: the hand MSE equals the loss function's, and it fell from the initial one.
  batch = _batch(99_999)
  returns = np.asarray(value.mc_returns(jnp.asarray(batch["reward"]),
                                        jnp.asarray(batch["targets"]), cfg.discount))
  mask = batch["targets"] != 0

  def mse(p):
    values = np.asarray(net.apply(p, batch["inputs"], batch["targets"]))
    hand = ((values - returns) ** 2 * mask).sum() / mask.sum()
    loss, _ = value.value_loss_fn(cfg.discount)(jnp.asarray(values), batch)
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    return hand

  assert mse(params) < 0.7 * mse(init)


def test_init_from_policy_and_extras(net):
  policy = build_model(CONFIG, rngs=nnx.Rngs(7))
  graphdef, policy_params = nnx.split(policy)
  params = net.init(policy_params)
  pure, theirs = nnx.to_pure_dict(params), nnx.to_pure_dict(policy_params)
  np.testing.assert_array_equal(pure["trunk"]["embed"]["embedding"], theirs["embed"]["embedding"])
  np.testing.assert_array_equal(pure["trunk"]["layers_0"]["mlp"]["down_proj"]["kernel"],
                                theirs["layers_0"]["mlp"]["down_proj"]["kernel"])
  assert pure["trunk"]["lm_head"]["kernel"].shape == (CONFIG.d_model, 1)

  needs = frozenset({losses.NEEDS_VALUES, losses.NEEDS_BC_LOGPROBS})
  extras = build_extras(needs, layout=net.layout, policy_graphdef=graphdef,
                        bc_params=policy_params, value_net=net, value_params=params,
                        discount=0.5)
  batch = {k: jnp.asarray(v) for k, v in _batch(3, size=8).items()}
  out = extras(batch)
  assert set(out) == {"values", "returns", "bc_logprobs"}
  np.testing.assert_allclose(out["values"], net.apply(params, batch["inputs"], batch["targets"]),
                             atol=1e-5)
  np.testing.assert_allclose(out["returns"],
                             value.mc_returns(batch["reward"], batch["targets"], 0.5))
  logits = policy(batch["inputs"], batch["targets"])
  np.testing.assert_allclose(out["bc_logprobs"],
                             losses.token_logprobs(logits, batch["targets"]), atol=1e-5)
  assert build_extras(frozenset(), layout=net.layout, policy_graphdef=graphdef) is None


def test_checkpoint_round_trip(net, tmp_path):
  params = net.init()
  directory = str(tmp_path / "value_g001")
  saved = value.load_or_train_value(net, directory=directory, train=lambda: (params, [0.5, 0.25]))
  assert json.load(open(os.path.join(directory, "history.json")))["loss"] == [0.5, 0.25]

  def must_not_train():
    raise AssertionError("a saved value network must be restored, not retrained")

  restored = value.load_or_train_value(net, directory=directory, train=must_not_train)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(saved)),
               jax.device_get(nnx.to_pure_dict(restored)))
  leaves = jax.tree.leaves(restored)
  shardings = jax.tree.leaves(net.shardings)
  assert all(x.sharding == s for x, s in zip(leaves, shardings))
