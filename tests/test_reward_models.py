"""Reward specs: callables by import path, normalisation ranges, the learned reward model."""

import json
import os
import sys

import numpy as np
import pytest

from rest_jax.cli import main as cli
from rest_jax.config import RewardConfig
from rest_jax.errors import RestJaxError
from rest_jax.rewards import build_reward, check_reward_spec, reward_label, score
from rest_jax.rewards.learned import LearnedReward
from rest_jax.rewards.training import kendall_tau, load_scored_pairs, split_pairs

MODULE = '''
import numpy as np
def length(sources, hypotheses, references):
  return np.asarray([len(h) for h in hypotheses], float)
def wrong_shape(sources, hypotheses, references):
  return np.zeros((len(hypotheses), 2))
def nan(sources, hypotheses, references):
  return np.full(len(hypotheses), np.nan)
NOT_CALLABLE = 3
class Scorer:
  @staticmethod
  def half(sources, hypotheses, references):
    return np.full(len(hypotheses), 0.5)
'''


@pytest.fixture
def rm_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards_mod.py").write_text(MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "my_rewards_mod"
  sys.modules.pop("my_rewards_mod", None)


def test_callable_by_import_path(rm_module):
  fn = build_reward(f"py:{rm_module}:Scorer.half")
  assert list(score(fn, "half", ["a", "b"], ["x", "yy"], None)) == [0.5, 0.5]
  config = RewardConfig(range=(0, 4))
  fn = build_reward(f"py:{rm_module}:length", config)
  np.testing.assert_allclose(score(fn, reward_label("len", config), ["a"] * 3,
                                   ["", "ab", "abcd"], None), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("spec,message", [
    ("py:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("py:{m}:missing", "has no attribute 'missing'"),
    ("py:{m}:NOT_CALLABLE", "is a int, not a callable"),
    ("py:{m}", "must look like 'package.module:function'"),
    ("learned:/no/such/dir", "not a reward-model directory"),
    ("remote:ftp://x", "must start with http:// or https://"),
    ("chrff", "reward 'chrff' is unknown.*learned:DIR.*remote:URL.*py:module:function"),
])
def test_bad_specs_fail_clearly(rm_module, spec, message):
  with pytest.raises(RestJaxError, match=message):
    check_reward_spec(spec.format(m=rm_module))


def test_wrong_outputs_and_ranges_fail_clearly(rm_module):
  with pytest.raises(RestJaxError, match=r"returned shape \(2, 2\) for 2 hypotheses"):
    score(build_reward(f"py:{rm_module}:wrong_shape"), "w", ["a", "b"], ["x", "y"], None)
  with pytest.raises(RestJaxError, match="returned nan"):
    score(build_reward(f"py:{rm_module}:nan"), "n", ["a"], ["x"], None)
  config = RewardConfig(range=(0, 2))
  with pytest.raises(RestJaxError, match=r"with declared range \(0.0, 2.0\)' returned 1.5 for "
                                         r"example 1.*RewardConfig.range"):
    score(build_reward(f"py:{rm_module}:length", config), reward_label("len", config),
          ["a", "b"], ["x", "abc"], None)
  with pytest.raises(RestJaxError, match="lo < hi"):
    RewardConfig(range=(1.0, 1.0))


def test_gin_binds_the_reward_config():
  config, _ = cli.parse_run_config(["experiments/smoke_cpu.gin"], [
      "config.RunConfig.reward = 'py:numpy:ones_like'", "config.RewardConfig.range = (0, 100)"])
  assert config.reward == "py:numpy:ones_like" and config.reward_config.range == (0.0, 100.0)


def test_kendall_tau_matches_hand_computed_value():
  # Pairs: (1,2) C, (1,3) C, (1,4) C, (2,3) D, (2,4) C, (3,4) C -> (5 - 1) / 6.
  x, y = np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])
  assert kendall_tau(x, y) == pytest.approx(4 / 6)


def _write_pairs(path):
  words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
  with open(path, "w") as f:
    for i, w in enumerate(words):
      for hyp, s in ((w, 1.0), (w[:2], 0.4), ("x", 0.0), (w, 1.0)):  # One duplicate dropped.
        f.write(json.dumps({"source": f"n{i}", "hypothesis": hyp, "score": s * 10,
                            "example_id": i}) + "\n")


def test_train_reward_cli_saves_a_model_usable_as_reward(tmp_path, capsys):
  data, out = str(tmp_path / "pairs.jsonl"), str(tmp_path / "rm")
  _write_pairs(data)
  pairs = load_scored_pairs(data, score_range=(0, 10))
  assert len(pairs) == 24 and sorted(set(pairs.scores.tolist())) == pytest.approx([0, .4, 1])
  train, held = split_pairs(pairs, held_out_fraction=0.25)
  assert not set(train.groups) & set(held.groups) and len(held) % 3 == 0 and len(held) > 0
  assert cli.main(["train-reward", "--data", data, "--output_dir", out, "--num_steps", "3",
                   "--batch_size", "8", "--input_len", "8", "--target_len", "8",
                   "--held_out_fraction", "0.25", "--range", "0", "10"]) == 0
  metrics = json.loads(capsys.readouterr().out.splitlines()[0])
  assert metrics["train_pairs"] + metrics["held_out_pairs"] == 24
  meta = json.load(open(os.path.join(out, "reward_model.json")))
  assert meta["vocabulary"] == {"kind": "byte"} and meta["model"]["d_model"] == 32
  reward = build_reward(f"learned:{out}", RewardConfig(batch_size=16))
  values = score(reward, "learned", ["n0", "n1", "n2"], ["one", "tw", "x"], None)
  assert values.shape == (3,) and len(np.unique(values)) == 3  # Each hypothesis is read.
  again = reward(["n2", "n0"], ["x", "one"], None)
  np.testing.assert_allclose(again, values[[2, 0]], rtol=1e-5)  # Independent of the batch.
  assert reward(["n9"], ["one"], None)[0] != pytest.approx(values[0], abs=1e-7)  # And x.
  assert isinstance(reward, LearnedReward) and reward.metrics == metrics
  assert cli.main(["train-reward", "--data", data, "--output_dir", out]) == 2
  assert "already holds a reward model" in capsys.readouterr().err
