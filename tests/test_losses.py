"""Losses against hand-computed values on a 2-sequence, vocab-3 batch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax.improve import losses
from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError

# Per-position token probabilities; logits = log(probs) so log_softmax(logits) = log(probs).
PROBS = np.array([
    [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.0001, 0.0001, 0.9998]],  # 3rd position is padding.
    [[0.25, 0.25, 0.5], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]],  # 2nd, 3rd are padding.
], np.float32)
TARGETS = np.array([[2, 1, 0], [1, 0, 0]], np.int32)


def _batch(reward=(1.0, 0.5)):
  return {
      "inputs": np.array([[3, 1], [2, 1]], np.int32),
      "targets": TARGETS,
      "reward": np.asarray(reward, np.float32),
      "behaviour_logprobs": np.zeros((2, 3), np.float32),
      "is_original": np.array([1, 0], np.int32),
  }


def _logits():
  return jnp.asarray(np.log(PROBS))


def test_bc_loss_hand_values():
  loss, metrics = losses.bc_loss(_logits(), _batch())
  expected = -(math.log(0.5) + math.log(0.6) + math.log(0.25)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
  # argmax: seq0 pos0 -> 2 (right), pos1 -> 1 (right); seq1 pos0 -> 2 (target 1, wrong).
  np.testing.assert_allclose(metrics["token_accuracy"], 2 / 3, rtol=1e-6)
  assert float(metrics["num_tokens"]) == 3.0


def test_bc_loss_ignores_padding_logits():
  logits = np.log(PROBS).copy()
  logits[0, 2] = [50.0, -50.0, 3.0]
  logits[1, 1:] = 123.0
  loss, _ = losses.bc_loss(jnp.asarray(logits), _batch())
  np.testing.assert_allclose(loss, -(math.log(0.5) + math.log(0.6) + math.log(0.25)) / 3,
                             rtol=1e-6)


def test_bc_loss_gradient_is_softmax_minus_onehot():
  grad = jax.grad(lambda lg: losses.bc_loss(lg, _batch())[0])(_logits())
  expected = np.zeros_like(PROBS)
  for b, t in [(0, 0), (0, 1), (1, 0)]:
    expected[b, t] = (PROBS[b, t] - np.eye(3)[TARGETS[b, t]]) / 3
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_reward_weighted_bc_hand_values():
  loss, metrics = losses.reward_weighted_bc_loss(_logits(), _batch(reward=(1.0, 0.5)))
  expected = -(1.0 * (math.log(0.5) + math.log(0.6)) + 0.5 * math.log(0.25)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["mean_reward"], 0.75, rtol=1e-6)
  np.testing.assert_allclose(metrics["token_accuracy"], 2 / 3, rtol=1e-6)
  assert float(metrics["num_tokens"]) == 3.0


def test_reward_weighted_bc_with_unit_rewards_equals_bc():
  bc, _ = losses.bc_loss(_logits(), _batch())
  rw, _ = losses.reward_weighted_bc_loss(_logits(), _batch(reward=(1.0, 1.0)))
  np.testing.assert_allclose(rw, bc, rtol=1e-6)
  zero, _ = losses.reward_weighted_bc_loss(_logits(), _batch(reward=(0.0, 0.0)))
  assert float(zero) == 0.0


def test_all_padding_batch_is_finite_zero():
  batch = _batch()
  batch["targets"] = np.zeros_like(TARGETS)
  for fn in (losses.bc_loss, losses.reward_weighted_bc_loss):
    loss, metrics = jax.jit(fn)(_logits(), batch)
    assert float(loss) == 0.0
    assert float(metrics["num_tokens"]) == 0.0
    assert float(metrics["token_accuracy"]) == 0.0


def test_bfloat16_logits_are_computed_in_float32():
  loss, _ = losses.bc_loss(_logits().astype(jnp.bfloat16), _batch())
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, -(math.log(0.5) + math.log(0.6) + math.log(0.25)) / 3,
                             rtol=2e-2)


def test_registry():
  # One kind of entry: TrainConfig -> Loss; plain losses are wrapped once, at registration.
  bc = losses.make_loss(TrainConfig(loss="bc"))
  assert isinstance(bc, losses.Loss) and not bc.needs and bc.init_params is None
  assert losses.make_loss(TrainConfig(loss="bc", learning_rate=1e-3)) is bc
  for name in ("gold", "bvmpo", "oac", "raft_pp"):
    assert isinstance(losses.make_loss(TrainConfig(loss=name)), losses.Loss)
  losses.check_loss_name("reward_weighted_bc")
  with pytest.raises(RestJaxError,
                     match=r"unknown loss 'ppo'.*\['bc', 'bvmpo', 'gold', 'oac', 'raft_pp', "
                     r"'reward_weighted_bc'\]"):
    losses.check_loss_name("ppo")
  with pytest.raises(RestJaxError, match="unknown loss 'ppo'"):
    losses.make_loss(TrainConfig(loss="ppo"))


def test_register_loss(monkeypatch):
  monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))

  def double_bc(logits, batch):
    loss, metrics = losses.bc_loss(logits, batch)
    return 2 * loss, metrics

  losses.register_loss("double_bc", double_bc)
  loss = losses.make_loss(TrainConfig(loss="double_bc"))
  assert isinstance(loss, losses.Loss)
  logits = jnp.zeros([1, 2, 4])
  batch = {"targets": jnp.asarray([[2, 1]], jnp.int32)}
  np.testing.assert_allclose(loss.fn(logits, batch, {})[0],
                             2 * losses.bc_loss(logits, batch)[0], rtol=1e-6)
  with pytest.raises(RestJaxError, match="already registered"):
    losses.register_loss("bc", double_bc)
  with pytest.raises(RestJaxError, match="already registered"):
    losses.register_loss_builder("gold", lambda cfg: loss)
