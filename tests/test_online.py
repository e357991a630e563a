"""Online (GRPO) and semi-online ReST on the arithmetic task: rows, cost counts, determinism."""

import dataclasses

import numpy as np
import jax
import pytest

from rest_jax import config as C
from rest_jax import tasks
from rest_jax.errors import RestJaxError
from rest_jax.models import get_preset
from rest_jax.online import cost, loop
from rest_jax.pipeline import build
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.workdir import Workdir
from rest_jax.tasks import arith

tasks.register(arith.make_arith_task("arith_online_test", num_train=32, num_eval=8,
                                     max_operand=99, seed=0, num_test=8))


def length_reward(sources, hypotheses, references):
  """A graded reward any two samples of different lengths tell apart (so advantages are not 0
  even for an untrained policy)."""
  del sources, references
  return np.array([min(len(h), 8) / 8 for h in hypotheses])


def _config(algorithm="online", **online) -> C.RunConfig:
  return C.RunConfig(
      task="arith_online_test", model=get_preset("tiny_decoder"),
      reward="py:test_online:length_reward", eval=C.EvalConfig(
          num_examples=8, batch_size=8, max_decode_len=8, independent_metric="none"),
      input_len=12, target_len=8, algorithm=algorithm,
      online=C.OnlineConfig(**{**dict(num_steps=2, prompts_per_step=4, regrow_every=1,
                                      eval_every=1, kl_coef=0.1), **online}),
      bc=C.TrainConfig(learning_rate=3e-3, num_steps=2, batch_size=8, eval_every=2),
      improve=C.ImproveConfig(train=C.TrainConfig(learning_rate=1e-2, batch_size=8)),
      grow=C.GrowConfig(sampling=C.SamplingConfig(num_samples=2, batch_size=8,
                                                  max_decode_len=8)))


def _leaves(workdir, cfg, phase):
  params = build.build(cfg, Workdir(workdir), progress=False).restore_best(phase)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow  # Three tiny end-to-end runs: 170 s on the loaded 2-core CPU (--run_slow).
def test_two_online_steps(tmp_path):
  cfg = _config()
  rows = pipeline.run(cfg, str(tmp_path / "a"), progress=False)["rows"]
  assert [(r["phase"], r["improve_step"]) for r in rows] == [("bc", 0), ("online", 1),
                                                              ("online", 2)]
  p = cost.num_params(build.resolve(cfg).abstract_params)
  bc_tokens = 2 * 8 * (12 + 8)  # 2 BC steps of 8 rows.
  assert rows[0]["samples_drawn"] == 0 and rows[0]["trained_tokens"] == bc_tokens
  for k, r in enumerate(rows[1:], start=1):
    assert r["samples_drawn"] == k * 4 * 2  # k steps x 4 prompts x N = 2.
    assert r["trained_tokens"] == bc_tokens + k * 8 * (12 + 8)
    assert r["flops"] == pytest.approx(2 * p * r["sampled_tokens"] + 6 * p * r["trained_tokens"])
    assert {"test_reward", "test_exact_match"} <= set(r)
    assert np.isfinite(r["eval_reward"])
  moved = [not np.array_equal(a, b) for a, b in zip(_leaves(str(tmp_path / "a"), cfg, "bc"),
                                                    _leaves(str(tmp_path / "a"), cfg, "online"))]
  assert any(moved)
  again = pipeline.run(cfg, str(tmp_path / "b"), progress=False)["rows"]
  assert again == rows  # Deterministic: same samples, same updates, same rows.
  assert pipeline.run(cfg, str(tmp_path / "a"), progress=False)["rows"] == rows  # Read back.


def test_advantages_and_loss():
  r = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
  a = loop.advantages(r, 2, algorithm="online", threshold=1.0)
  np.testing.assert_allclose(a, [1, -1, 0, 0, 0, 0], atol=1e-5)
  np.testing.assert_array_equal(loop.advantages(r, 2, algorithm="semi_online", threshold=0.5),
                                r)
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  batch = {"targets": np.array([[1, 2, 0], [3, 0, 0]]), "advantage": np.array([1.0, -1.0]),
           "start_logprobs": np.zeros((2, 3))}
  loss, metrics = loop.make_loss(0.5).fn(logits, batch, {})
  assert np.isfinite(float(loss)) and float(metrics["kl"]) > 0


@pytest.mark.parametrize("cfg,knob", [
    (lambda: _config(regrow_every=2), "OnlineConfig.regrow_every"),
    (lambda: dataclasses.replace(_config(), grow=C.GrowConfig(
        sampling=C.SamplingConfig(num_samples=1, batch_size=8, max_decode_len=8))),
     "SamplingConfig.num_samples >= 2"),
    (lambda: _config("semi_online", prompts_per_step=3, regrow_every=2), "not divisible"),
])
def test_impossible_online_configs(cfg, knob):
  with pytest.raises(RestJaxError, match=knob) as e:
    loop.check(cfg(), num_batch_shards=4)
  assert "\n" not in str(e.value)
  with pytest.raises(RestJaxError, match="RunConfig.algorithm"):
    C.RunConfig(algorithm="ppo")


def test_impossible_online_config_fails_before_the_workdir_is_touched(tmp_path):
  cfg = dataclasses.replace(_config(), grow=C.GrowConfig(sampling=C.SamplingConfig(
      num_samples=1, batch_size=8, max_decode_len=8)))
  with pytest.raises(RestJaxError, match="SamplingConfig.num_samples >= 2"):
    pipeline.run(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def _stub_run(cfg):
  """The parts of a built Run the loop reads, with a model-free sampler (no sampler compile)."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from conftest import mesh_layout  # pylint: disable=g-import-not-at-top
  from rest_jax.grow.fake import FakeSampler  # pylint: disable=g-import-not-at-top
  from rest_jax.models import build_model  # pylint: disable=g-import-not-at-top

  graphdef, params = nnx.split(build_model(cfg.model, rngs=nnx.Rngs(0)))
  task = tasks.get_task(cfg.task)
  run = SimpleNamespace(
      config=cfg, layout=mesh_layout(), graphdef=graphdef, task=task,
      vocab=task.output_features["targets"].vocabulary, reward=length_reward,
      parts=SimpleNamespace(grow_sampler=FakeSampler(2, max_decode_len=8)),
      reporter=SimpleNamespace(scalars=lambda *a: None))
  return run, params


def test_two_online_steps_fast():
  cfg = _config()
  rows_of, params_of = [], []
  for _ in range(2):
    run, params = _stub_run(cfg)
    start = [np.asarray(x) for x in jax.tree.leaves(params)]
    rows, final = loop.run_online(
        run, params, start_cost=cost.Cost(),
        evaluate=lambda name, p, info: {"step": info["improve_step"],
                                        "loss": info["train_loss"], **info["cost"].as_row()})
    rows_of.append(rows)
    params_of.append([np.asarray(x) for x in jax.tree.leaves(final)])
  rows = rows_of[0]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert [r["samples_drawn"] for r in rows] == [8, 16]  # 4 prompts x N = 2 per step.
  p = cost.num_params(params)
  assert rows[1]["flops"] == pytest.approx(2 * p * 16 * (12 + 8) + 6 * p * 16 * (12 + 8))
  assert any(not np.array_equal(a, b) for a, b in zip(start, params_of[0]))  # Params moved.
  assert rows_of[0] == rows_of[1]  # Deterministic rerun.
  for a, b in zip(*params_of):
    np.testing.assert_array_equal(a, b)
