"""The reward-model fit: its losses, that it learns, the array export and the accelerator script."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax.cli import main as cli
from rest_jax.config import RewardConfig
from rest_jax.errors import RestJaxError
from rest_jax.models import get_preset
from rest_jax.rewards import build_reward
from rest_jax.rewards.fitting import (EncodedPairs, RewardTrainConfig, fit_reward_model,
                                      kendall_tau, reward_losses)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softplus(x):
  return np.log1p(np.exp(x))


def test_reward_losses_match_hand_computation():
  logits, scores = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.0, 0.5])
  ce = np.mean(scores * _softplus(-logits) + (1 - scores) * _softplus(logits))
  # Ordered pairs with s_i > s_j: (0, 1), (0, 2), (2, 1); each costs softplus(l_j - l_i).
  ranking = np.mean([_softplus(-1.0 - 0.5), _softplus(2.0 - 0.5), _softplus(-1.0 - 2.0)])
  total, rank = reward_losses(jnp.asarray(logits), jnp.asarray(scores), ranking_weight=0.5)
  np.testing.assert_allclose(float(rank), ranking, rtol=1e-6)
  np.testing.assert_allclose(float(total), ce + 0.5 * ranking, rtol=1e-6)
  _, tied = reward_losses(jnp.asarray(logits), jnp.full(3, 0.3), ranking_weight=1.0)
  assert float(tied) == 0.0  # No ordered pair: no ranking term (and no division by zero).


def _toy(n, seed):
  """Hypotheses of 4 letters from {a, b}; score = fraction of a's (byte ids 100 and 101)."""
  rng = np.random.default_rng(seed)
  letters = rng.integers(0, 2, (n, 4))
  targets = np.zeros((n, 8), np.int32)
  targets[:, :4] = np.where(letters == 0, 100, 101)
  targets[:, 4] = 1  # EOS
  inputs = np.zeros((n, 8), np.int32)
  inputs[:, 0], inputs[:, 1] = rng.integers(100, 120, n), 1
  return EncodedPairs(inputs, targets, (letters == 0).mean(1).astype(np.float32))


def test_fit_learns_a_toy_reward():
  train, held = _toy(256, 0), _toy(64, 1)
  cfg = RewardTrainConfig(num_steps=200, batch_size=32, learning_rate=3e-3, warmup_steps=10,
                          input_len=8, target_len=8, eval_every=100, steps_per_call=100)
  params, metrics, curve = fit_reward_model(train, held, model=get_preset("tiny"), cfg=cfg,
                                            progress=False)
  # 5 distinct scores on 64 held-out pairs; a model that ranks by the count of a's gets tau 1.
  assert metrics["held_out_kendall_tau"] > 0.8, metrics
  assert metrics["held_out_mae"] < 0.1 and metrics["num_steps"] == 200
  assert [c["step"] for c in curve] == [100, 200]
  assert curve[-1]["held_out_kendall_tau"] == metrics["held_out_kendall_tau"]
  with pytest.raises(RestJaxError, match="multiple of 8"):
    fit_reward_model(train, held, model=get_preset("tiny"), progress=False,
                     cfg=RewardTrainConfig(num_steps=1, batch_size=12, input_len=8,
                                           target_len=8))


def test_kendall_tau_of_a_perfect_and_a_reversed_ranking():
  x = np.array([0.1, 0.4, 0.2, 0.9])
  assert kendall_tau(x, 2 * x) == pytest.approx(1.0)
  assert kendall_tau(x, -x) == pytest.approx(-1.0)


def test_exported_arrays_fit_by_the_accelerator_script_give_a_usable_reward(tmp_path, capsys):
  data, npz, out = tmp_path / "pairs.jsonl", str(tmp_path / "pairs.npz"), str(tmp_path / "rm")
  with open(data, "w", encoding="utf-8") as f:
    for i in range(40):
      f.write(json.dumps({"source": f"n{i}", "hypothesis": "ab"[i % 2] * (1 + i % 3),
                          "score": (i % 3) / 2, "example_id": i}) + "\n")
  assert cli.main(["train-reward", "--data", str(data), "--output_dir", out, "--input_len", "8",
                   "--target_len", "8", "--held_out_fraction", "0.25",
                   "--export_arrays", npz]) == 0
  sizes = json.loads(capsys.readouterr().out.splitlines()[0])
  assert sizes["train_pairs"] + sizes["held_out_pairs"] == 40 and not os.path.exists(out)
  with np.load(npz) as f:
    assert f["train_inputs"].shape == (sizes["train_pairs"], 8)
    assert f["held_targets"].shape == (sizes["held_out_pairs"], 8)
    assert json.loads(str(f["meta"]))["vocabulary"] == {"kind": "byte"}
  spec = importlib.util.spec_from_file_location(
      "fit_reward_arrays", os.path.join(ROOT, "launch", "fit_reward_arrays.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  # A time limit stops the fit after its first call of 2 steps; the model is still saved.
  metrics = script.main([npz, out, "--num_steps", "6", "--batch_size", "8", "--eval_every", "2",
                         "--steps_per_call", "2", "--max_seconds", "1e-9", "--set", "mlp_dim=48",
                         "--no_progress"])
  assert metrics["num_steps"] == 2 and [c["step"] for c in metrics["curve"]] == [2]
  meta = json.load(open(os.path.join(out, "reward_model.json")))
  assert meta["model"]["mlp_dim"] == 48 and meta["input_len"] == 8
  reward = build_reward(f"learned:{out}", RewardConfig(batch_size=8))
  values = reward(["n1", "n2", "n3"], ["a", "bb", "aaa"], None)
  assert values.shape == (3,) and len(np.unique(values)) == 3  # The saved model reads inputs.
  np.testing.assert_allclose(reward(["n3", "n1"], ["aaa", "a"], None), values[[2, 0]], rtol=1e-5)
  with pytest.raises(RestJaxError, match="already holds a reward model"):
    script.main([npz, out, "--num_steps", "1", "--batch_size", "8", "--no_progress"])
