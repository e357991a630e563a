"""Best-of-N: nested prefixes, hand values, a real sampler, workdir helpers and the CLI errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from rest_jax import tasks

from rest_jax.cli import bestofn

from rest_jax.cli import main
from rest_jax import config as C
from rest_jax.errors import RestJaxError
from rest_jax.models import build_model, get_preset
from rest_jax.grow.sampler import Sampler
from conftest import mesh_layout
from rest_jax.pipeline.workdir import Workdir


def test_hand_values():
  rewards = np.asarray([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.6, 0.0]])
  assert bestofn.best_of_n(rewards, [4, 1, 2]) == {
      1: pytest.approx(0.25), 2: pytest.approx(0.45), 4: pytest.approx(0.75)}
  with pytest.raises(RestJaxError, match="exceeds the 4 samples"):
    bestofn.best_of_n(rewards, [8])


def test_nested_and_monotone():
  rewards = np.random.default_rng(0).uniform(size=(50, 16))
  table = bestofn.best_of_n(rewards, [1, 2, 4, 8, 16])
  assert table[1] == pytest.approx(rewards[:, 0].mean())  # N = 1: the mean sampled reward.
  values = [table[n] for n in (1, 2, 4, 8, 16)]
  assert all(b >= a for a, b in zip(values, values[1:]))
  # Nested prefixes: best-of-4 reads samples 0..3 only, in any order, and every one of them.
  shuffled = rewards.copy()
  shuffled[:, :4] = shuffled[:, [3, 1, 0, 2]]
  shuffled[:, 4:] = 0.0
  assert bestofn.best_of_n(shuffled, [4])[4] == pytest.approx(table[4])
  raised = rewards.copy()
  raised[0, 3] = 1.0  # Sample 3 of prompt 0 becomes its best: best-of-4 moves, best-of-2 not.
  gain = (1.0 - rewards[0, :4].max()) / len(rewards)
  assert bestofn.best_of_n(raised, [2, 4]) == {2: pytest.approx(table[2]),
                                               4: pytest.approx(table[4] + gain)}


def test_parse_ns():
  assert bestofn.parse_ns("16,1, 4,2,4") == [1, 2, 4, 16]
  for bad in ("", "0,2", "a"):
    with pytest.raises(RestJaxError, match="positive integers"):
      bestofn.parse_ns(bad)


def test_real_sampler_samples_are_nested_prefixes():
  model = build_model(get_preset("tiny", num_encoder_layers=1, num_decoder_layers=1, d_model=16,
                                 mlp_dim=32, num_heads=1, num_kv_heads=1), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  layout = mesh_layout(devices=__import__("jax").devices()[:1])
  vocab = tasks.ENCDEC_FEATURES["targets"].vocabulary
  inputs = np.random.default_rng(0).integers(3, 100, size=(3, 5)).astype(np.int32)
  length = lambda s, h, r: np.asarray([min(len(x), 20) / 20 for x in h], np.float32)
  kw = dict(params=params, inputs=inputs, sources=["s"] * 3, references=["r"] * 3,
            reward=length, vocab=vocab, seed=3, batch_size=2)
  four = bestofn.sample_rewards(sampler=Sampler(graphdef, layout, num_samples=4,
                                                max_decode_len=5, temperature=2.0), **kw)
  two = bestofn.sample_rewards(sampler=Sampler(graphdef, layout, num_samples=2,
                                               max_decode_len=5, temperature=2.0), **kw)
  assert four.shape == (3, 4)
  np.testing.assert_array_equal(four[:, :2], two)  # Sample n does not depend on max N.
  assert len(np.unique(four)) > 1  # The samples differ (the test can tell them apart).
  table = bestofn.best_of_n(four, [1, 2, 4])
  assert table[1] == pytest.approx(four[:, 0].mean())


def test_workdir_helpers(tmp_path):
  cfg = C.RunConfig(task="numbers_de_en_small", num_grow_steps=2, num_improve_steps=1,
                    improve=C.ImproveConfig(thresholds=(0.9, 0.95), schedule="linear"))
  values = json.loads(json.dumps(dataclasses.asdict(cfg)))
  del values["improve"]["mix_previous_grows"]  # Written before the field existed: default.
  values["improve"]["unknown_field"] = 1  # Ignored.
  os.makedirs(tmp_path / "phases")
  with open(tmp_path / "run_config.json", "w") as f:
    json.dump(values, f)
  assert Workdir(str(tmp_path)).load_run_config() == cfg
  for name in ("bc", "g001_i01", "g002_i01"):
    (tmp_path / "phases" / f"{name}.json").write_text("{}")
  assert Workdir(str(tmp_path)).resolve_phase("final") == "g002_i01"
  assert Workdir(str(tmp_path)).resolve_phase("g1_i1") == "g001_i01"
  assert Workdir(str(tmp_path)).resolve_phase("bc") == "bc"
  with pytest.raises(RestJaxError, match="phase 'g3_i1' has no finished checkpoint"):
    Workdir(str(tmp_path)).resolve_phase("g3_i1")


def test_cli_errors(tmp_path, capsys):
  code = main.main(["best-of-n", "--workdir", str(tmp_path / "nothing"), "--n", "1,2"])
  err = capsys.readouterr().err
  assert code == 2 and "run_config.json does not exist" in err and "Traceback" not in err
  code = main.main(["best-of-n", str(tmp_path), "--n", "0"])  # Positional workdir.
  assert code == 2 and "positive integers" in capsys.readouterr().err
