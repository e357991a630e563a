"""GOLD, OAC and BVMPO against numpy hand computations, and one Improve step with each loss
(BC and reward-weighted BC included) on a high- and a low-reward sequence."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rest_jax.improve import losses
from rest_jax.config import BvmpoConfig, GoldConfig, OacConfig, RaftPpConfig, TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.trainer import Trainer
from conftest import mesh_layout
from rest_jax.improve.value import mc_returns

RNG = np.random.default_rng(0)
B, T, V = 2, 4, 5
LOGITS = RNG.normal(size=(B, T, V)).astype(np.float32)
TARGETS = np.array([[3, 2, 4, 1], [2, 1, 0, 0]], np.int32)  # Second row: 2 tokens.
MASK = (TARGETS != 0).astype(np.float64)
BC_LOGPROBS = np.log(RNG.uniform(0.05, 0.95, size=(B, T))).astype(np.float32)
VALUES = RNG.uniform(0, 1, size=(B, T)).astype(np.float32)
REWARD = np.array([0.9, 0.2], np.float32)
BEHAVIOUR = np.log(RNG.uniform(0.05, 0.95, size=(B, T))).astype(np.float32)
START_LOGITS = RNG.normal(size=(B, T, V)).astype(np.float32)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)


def _logp():
  return np.take_along_axis(_log_softmax(LOGITS), TARGETS[..., None], -1)[..., 0]


def _returns(discount=1.0):
  out = np.zeros((B, T))
  for b in range(B):
    last = int(MASK[b].sum()) - 1
    for t in range(last + 1):
      out[b, t] = REWARD[b] * discount ** (last - t)
  return out


def _batch(**extra):
  batch = {"targets": jnp.asarray(TARGETS), "reward": jnp.asarray(REWARD),
           "behaviour_logprobs": jnp.asarray(BEHAVIOUR), "step": jnp.int32(3)}
  batch.update({k: jnp.asarray(v) for k, v in extra.items()})
  return batch


def test_mc_returns_hand_values():
  np.testing.assert_allclose(mc_returns(jnp.asarray(REWARD), jnp.asarray(TARGETS), 0.5),
                             _returns(0.5), rtol=1e-6)
  assert _returns(0.5)[0].tolist() == pytest.approx([0.9 / 8, 0.9 / 4, 0.9 / 2, 0.9])


@pytest.mark.parametrize("reward", ["prob", "logprob"])
def test_gold_hand_values_and_gradient(reward):
  cfg = GoldConfig(horizon=2, discount=0.5, weight_floor=0.3, reward=reward,
                   log_reward_baseline=-2.0, reward_min=0.1)
  r = np.exp(BC_LOGPROBS) if reward == "prob" else BC_LOGPROBS + 2.0
  r = np.maximum(r, 0.1) * MASK
  q = np.zeros((B, T))
  for t in range(T):
    q[:, t] = r[:, t] + (0.5 * r[:, t + 1] if t + 1 < T else 0.0)
  q *= MASK
  logp = _logp()
  w = np.maximum(np.exp(logp), 0.3)
  expected = -(w * q * logp * MASK).sum() / MASK.sum()
  batch = _batch(bc_logprobs=BC_LOGPROBS)
  loss, metrics = losses.gold_loss(jnp.asarray(LOGITS), batch, cfg)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["mean_return"]) == pytest.approx((q * MASK).sum() / MASK.sum(), rel=1e-5)
  # w and Q carry no gradient: d loss / d logits = -(w Q / N) (onehot - softmax).
  grad = jax.grad(lambda x: losses.gold_loss(x, batch, cfg)[0])(jnp.asarray(LOGITS))
  onehot = np.eye(V)[TARGETS]
  hand = -((w * q * MASK) / MASK.sum())[..., None] * (onehot - np.exp(_log_softmax(LOGITS)))
  np.testing.assert_allclose(grad, hand, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_oac_hand_values(normalize):
  adv = (_returns() - VALUES) * MASK
  mean = (adv * MASK).sum() / MASK.sum()
  if normalize:
    adv = adv / (np.sqrt((((adv - mean) ** 2) * MASK).sum() / MASK.sum()) + 1e-6)
  expected = -(adv * _logp() * MASK).sum() / MASK.sum()
  loss, metrics = losses.oac_loss(jnp.asarray(LOGITS), _batch(values=VALUES, returns=_returns()),
                                  OacConfig(normalize_advantages=normalize))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["mean_advantage"]) == pytest.approx(mean, rel=1e-5)


def test_bvmpo_hand_values_and_multiplier_gradients():
  cfg = BvmpoConfig(eps_eta=0.2, eps_alpha=0.05, init_eta=0.7, init_alpha=1.3, kl_start=1.0,
                    kl_end=1e-4)
  params = losses.actor_critic.bvmpo_init_params(cfg)
  batch = _batch(values=VALUES, returns=_returns(), start_logprobs=_log_softmax(START_LOGITS))
  loss, m = losses.bvmpo_loss(jnp.asarray(LOGITS), batch, params, cfg, num_steps=6)

  adv = ((_returns() - VALUES) * MASK)
  valid = adv[MASK > 0]
  k = math.ceil(0.5 * valid.size)  # 6 tokens -> top 3.
  threshold = np.sort(valid)[::-1][k - 1]
  top = (MASK > 0) & (adv >= threshold)
  assert top.sum() == 3
  eta, alpha = 0.7, 1.3
  psi = np.where(top, np.exp(adv / eta), 0.0)
  psi /= psi.sum()
  logp = _logp()
  policy = -(psi * logp).sum()
  eta_loss = eta * 0.2 + eta * np.log(np.exp(adv[top] / eta).mean())
  start = _log_softmax(START_LOGITS)
  kl = ((np.exp(start) * (start - _log_softmax(LOGITS))).sum(-1) * MASK).sum() / MASK.sum()
  alpha_loss = alpha * (0.05 - kl) + alpha * kl
  kl_b = ((BEHAVIOUR - logp) * MASK).sum() / MASK.sum()
  lam = 1.0 * (1e-4) ** (3 / 6)
  expected = policy + eta_loss + alpha_loss + lam * kl_b
  assert float(m["policy_loss"]) == pytest.approx(policy, rel=1e-5)
  assert float(m["eta_loss"]) == pytest.approx(eta_loss, rel=1e-5)
  assert float(m["kl_start"]) == pytest.approx(kl, rel=1e-5)
  assert float(m["kl_weight"]) == pytest.approx(lam, rel=1e-5)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # Multipliers: d/d raw_alpha = sigmoid(raw) (eps_alpha - KL); d/d raw_eta = sigmoid(raw) *
  # (eps_eta + log mean exp(A/eta) - sum softmax(A/eta) A / eta).
  grads = jax.grad(lambda p: losses.bvmpo_loss(jnp.asarray(LOGITS), batch, p, cfg,
                                               num_steps=6)[0])(params)
  sig = lambda x: 1 / (1 + math.exp(-float(x)))
  assert float(grads["raw_alpha"]) == pytest.approx(sig(params["raw_alpha"]) * (0.05 - kl),
                                                    rel=1e-4)
  d_eta = 0.2 + np.log(np.exp(adv[top] / eta).mean()) - (psi[top] * adv[top]).sum() / eta
  assert float(grads["raw_eta"]) == pytest.approx(sig(params["raw_eta"]) * d_eta, rel=1e-4)


def test_make_loss_reads_the_train_config():
  loss = losses.make_loss(TrainConfig(loss="gold", gold=GoldConfig(horizon=1, weight_floor=1.0)))
  assert loss.needs == {"bc_logprobs"} and loss.init_params is None
  batch = _batch(bc_logprobs=np.zeros((B, T), np.float32))  # pi_BC = 1: Q = 1, w = 1: BC.
  value, _ = loss.fn(jnp.asarray(LOGITS), batch, {})
  assert float(value) == pytest.approx(float(losses.bc_loss(jnp.asarray(LOGITS), batch)[0]),
                                       rel=1e-6)
  assert losses.make_loss(TrainConfig(loss="bvmpo")).needs == {"values", "start_logprobs"}
  assert losses.make_loss(TrainConfig(loss="bc")).needs == frozenset()
  with pytest.raises(RestJaxError, match="GoldConfig.reward 'q' is unknown"):
    GoldConfig(reward="q")


# -- One Improve step: a high-reward sequence gains log-likelihood relative to a low-reward one --

VOCAB = 8
HIGH = [3, 4, 5, 1]
LOW = [6, 7, 2, 1]


class Tiny(nnx.Module):
  """Teacher-forced logits from the mean input embedding and the previous target token."""

  def __init__(self):
    rng = np.random.default_rng(1)
    p = lambda shape, names: nnx.Param(jnp.asarray(0.3 * rng.normal(size=shape), jnp.float32),
                                       out_sharding=names, eager_sharding=False)
    self.embed = p((VOCAB, 8), ("vocab", "embed"))
    self.out = p((8, VOCAB), ("embed", "vocab"))

  def __call__(self, inputs, targets):
    ctx = self.embed[...][inputs].mean(1)
    prev = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    return jnp.tanh(self.embed[...][prev] + ctx[:, None]) @ self.out[...]


GRAPHDEF, PARAMS = nnx.split(Tiny())
INPUTS = np.array([[2, 3]] * 8, np.int32)
PAIR = {"inputs": INPUTS, "targets": np.array([HIGH, LOW] * 4, np.int32),
        "reward": np.array([1.0, 0.0] * 4, np.float32),
        "behaviour_logprobs": np.full((8, 4), math.log(0.125), np.float32),
        "is_original": np.zeros(8, np.int32)}


def _seq_logp(params, targets):
  logits = nnx.merge(GRAPHDEF, params)(INPUTS[:1], np.array([targets], np.int32))
  return float(losses.token_logprobs(logits, jnp.asarray([targets])).sum())


def _extras(batch):
  """What the pre-pass gives: frozen policy log-probs, V = 0.5, MC returns."""
  logits = nnx.merge(GRAPHDEF, PARAMS)(batch["inputs"], batch["targets"])
  return {"bc_logprobs": losses.token_logprobs(logits, batch["targets"]),
          "start_logprobs": jax.nn.log_softmax(logits, -1),
          "values": jnp.full(batch["targets"].shape, 0.5, jnp.float32),
          "returns": mc_returns(batch["reward"], batch["targets"], 1.0)}


@pytest.mark.parametrize("name", ["bc", "gold"])
def test_reward_free_losses_ignore_the_reward(name):
  """bc and gold never read the reward: for them ReST's preference comes only from the
  threshold filter (tested with the thresholds), so they are not in the test below."""
  loss = losses.make_loss(TrainConfig(loss=name))
  swapped = dict(PAIR, reward=PAIR["reward"][::-1].copy())

  def value_and_grad(batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch.update(_extras(batch))
    fn = lambda p: loss.fn(nnx.merge(GRAPHDEF, p)(batch["inputs"], batch["targets"]), batch,
                           {})[0]
    return jax.value_and_grad(fn)(PARAMS)

  (a, grads_a), (b, grads_b) = value_and_grad(PAIR), value_and_grad(swapped)
  assert float(a) == float(b)
  jax.tree.map(np.testing.assert_array_equal, grads_a, grads_b)


@pytest.mark.parametrize("name", ["reward_weighted_bc", "oac", "bvmpo"])
def test_one_improve_step_prefers_the_high_reward_sample(name):
  """On an unfiltered batch of a high- and a low-reward sample, the reward alone steers."""
  cfg = TrainConfig(loss=name, learning_rate=0.05, num_steps=10, warmup_steps=0)
  batch = dict(PAIR)
  loss = losses.make_loss(cfg)
  trainer = Trainer(GRAPHDEF, mesh_layout(2, 2, 2), loss, optax.sgd(cfg.learning_rate),
                    extras=jax.jit(_extras) if loss.needs else None)
  state = trainer.init(PARAMS)
  state, metrics = trainer.train_step(state, batch)
  assert math.isfinite(float(metrics["loss"]))
  high = _seq_logp(state.params, HIGH) - _seq_logp(PARAMS, HIGH)
  low = _seq_logp(state.params, LOW) - _seq_logp(PARAMS, LOW)
  assert high > 0 and high > low + 1e-3, (high, low)
  if name == "bvmpo":  # The multipliers are trained too.
    assert set(state.loss_params) == {"raw_eta", "raw_alpha"}
    assert float(state.loss_params["raw_eta"]) != pytest.approx(
        float(losses.actor_critic.bvmpo_init_params(cfg.bvmpo)["raw_eta"]))


def test_trainer_refuses_a_loss_without_its_extras():
  with pytest.raises(RestJaxError, match="needs.*extras"):
    Trainer(GRAPHDEF, mesh_layout(2, 2, 2), losses.make_loss(TrainConfig(loss="oac")),
            optax.sgd(0.1))


# -- RAFT++: clipped, importance-weighted BC on the stored behaviour log-probs --

# Token ratios pi / pi_b: above, below and inside [0.7, 1.25]; per sequence 0.7425 (inside) and
# 1.56 (above).
RATIOS = np.array([[1.5, 0.5, 1.1, 0.9], [1.2, 1.3, 1.0, 1.0]])


def _raft_pp_by_hand(cfg, behaviour):
  """The loss, its gradient wrt the logits and the clip fraction, in numpy (float64)."""
  log_softmax = _log_softmax(LOGITS)
  logp = np.take_along_axis(log_softmax, TARGETS[..., None], -1)[..., 0]
  log_ratio = (logp - behaviour) * MASK
  if cfg.ratio == "sequence":
    log_ratio = np.repeat(log_ratio.sum(-1, keepdims=True), T, axis=-1)
  rho = np.exp(log_ratio)
  lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
  w = np.where(rho > hi, 0.0, rho) if cfg.clip == "ppo" else np.clip(rho, lo, hi)
  w *= MASK
  loss = -(w * logp).sum() / MASK.sum()
  onehot = np.eye(V)[TARGETS]
  grad = -(w[..., None] * (onehot - np.exp(log_softmax))) / MASK.sum()
  outside = (rho > hi) | ((rho < lo) & (cfg.clip == "truncate"))
  return loss, grad, (outside * MASK).sum() / MASK.sum()


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("clip", ["ppo", "truncate"])
def test_raft_pp_hand_values_and_gradient(ratio, clip):
  cfg = RaftPpConfig(ratio=ratio, clip=clip, clip_low=0.3, clip_high=0.25)
  behaviour = ((_logp() - np.log(RATIOS)) * MASK).astype(np.float32)
  expected, expected_grad, clipped = _raft_pp_by_hand(cfg, behaviour)
  assert clipped == {("token", "ppo"): 2 / 6, ("token", "truncate"): 3 / 6,
                     ("sequence", "ppo"): 2 / 6, ("sequence", "truncate"): 2 / 6}[ratio, clip]
  fn = lambda logits: losses.raft_pp_loss(logits, _batch(behaviour_logprobs=behaviour), cfg)
  (value, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(LOGITS))
  assert float(value) == pytest.approx(expected, rel=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
  assert float(metrics["clip_fraction"]) == pytest.approx(clipped, abs=1e-6)


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("clip", ["ppo", "truncate"])
def test_raft_pp_on_policy_is_bc(ratio, clip):
  """Behaviour = current policy: every ratio is 1, so the loss and its gradient are BC's."""
  logits = jnp.asarray(LOGITS)
  batch = _batch(behaviour_logprobs=losses.token_logprobs(logits, jnp.asarray(TARGETS)))
  loss = losses.make_loss(TrainConfig(loss="raft_pp",
                                      raft_pp=RaftPpConfig(ratio=ratio, clip=clip)))
  assert loss.needs == frozenset() and loss.init_params is None
  (value, metrics), grad = jax.value_and_grad(lambda x: loss.fn(x, batch, {}), has_aux=True)(
      logits)
  (bc, _), bc_grad = jax.value_and_grad(losses.bc_loss, has_aux=True)(logits, batch)
  assert float(value) == pytest.approx(float(bc), rel=1e-6)
  np.testing.assert_allclose(grad, bc_grad, rtol=1e-5, atol=1e-8)
  assert float(metrics["mean_weight"]) == pytest.approx(1.0)
  assert float(metrics["clip_fraction"]) == 0.0


def test_raft_pp_long_sequence_ratio_stays_finite():
  """A sequence ratio of exp(+-400) is clipped in log space: no inf or nan in loss or grad."""
  for behaviour in (-100.0, 100.0):
    batch = _batch(behaviour_logprobs=np.full((B, T), behaviour, np.float32))
    for clip in ("ppo", "truncate"):
      cfg = RaftPpConfig(ratio="sequence", clip=clip)
      (value, _), grad = jax.value_and_grad(
          lambda x: losses.raft_pp_loss(x, batch, cfg), has_aux=True)(jnp.asarray(LOGITS))
      assert math.isfinite(float(value)) and bool(jnp.isfinite(grad).all())


def test_raft_pp_config_errors():
  with pytest.raises(RestJaxError, match="RaftPpConfig.ratio 'step' is unknown"):
    RaftPpConfig(ratio="step")
  with pytest.raises(RestJaxError, match="RaftPpConfig.clip 'dual' is unknown"):
    RaftPpConfig(clip="dual")
  with pytest.raises(RestJaxError, match=r"clip_low must be in \[0, 1\)"):
    RaftPpConfig(clip_low=1.0)
  with pytest.raises(RestJaxError, match="clip_high must be a finite number >= 0"):
    RaftPpConfig(clip_high=-0.1)


@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_one_raft_pp_step_raises_the_kept_samples_log_likelihood(ratio):
  """Kept samples only (the selection filtered them); the behaviour policy was slightly less
  likely than the current one on them (ratio exp(0.04) per token, exp(0.16) per sequence of 4
  tokens: inside the clip range [0.8, 1.2])."""
  cfg = TrainConfig(loss="raft_pp", learning_rate=0.05, num_steps=10,
                    raft_pp=RaftPpConfig(ratio=ratio))
  targets = np.array([HIGH, LOW] * 4, np.int32)
  logits = nnx.merge(GRAPHDEF, PARAMS)(INPUTS, targets)
  behaviour = np.asarray(losses.token_logprobs(logits, jnp.asarray(targets))) - 0.04
  batch = dict(PAIR, reward=np.ones(8, np.float32),
               behaviour_logprobs=behaviour * (targets != 0))
  trainer = Trainer(GRAPHDEF, mesh_layout(2, 2, 2), losses.make_loss(cfg),
                    optax.sgd(cfg.learning_rate))
  state = trainer.init(PARAMS)
  state, metrics = trainer.train_step(state, batch)
  assert float(metrics["clip_fraction"]) == 0.0
  for sample in (HIGH, LOW):
    assert _seq_logp(state.params, sample) > _seq_logp(PARAMS, sample) + 1e-4
