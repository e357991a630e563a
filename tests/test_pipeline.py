"""End-to-end ReST loop: a tiny 2 Grow x 2 Improve run, interrupted twice and resumed, ends
exactly where an uninterrupted run ends (summary, Grow records, final parameters)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from rest_jax import config as C
from rest_jax.grow import dataset as growdata
from rest_jax.improve import trainer as improve
from rest_jax.errors import RestJaxError
from rest_jax.pipeline import build
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.workdir import Workdir, phase_name
from rest_jax.models import get_preset


def tiny_run_config() -> C.RunConfig:
  return C.RunConfig(
      task="numbers_de_en_small", model=get_preset("tiny", num_encoder_layers=1,
                                                  num_decoder_layers=1),
      reward="chrf", input_len=40, target_len=40, num_grow_steps=2, num_improve_steps=2,
      bc=C.TrainConfig(learning_rate=3e-3, num_steps=12, batch_size=16, eval_every=12),
      improve=C.ImproveConfig(train=C.TrainConfig(learning_rate=1e-3, num_steps=8,
                                                  batch_size=16, eval_every=4)),
      grow=C.GrowConfig(sampling=C.SamplingConfig(num_samples=2, batch_size=64,
                                                  max_decode_len=32), chunk_size=64),
      eval=C.EvalConfig(num_examples=32, batch_size=32, max_decode_len=32))


def _records(workdir):
  out = {}
  for g in (1, 2):
    for r in growdata.read_records(os.path.join(workdir, "grow", f"g{g:03d}")):
      out[(g, r.example_id, r.sample_idx)] = (tuple(r.targets), round(r.reward, 6))
  return out


def _final_params(workdir, cfg):
  params = build.build(cfg, Workdir(workdir), progress=False).restore_best(phase_name(2, 2))
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(params)]


class Crash(Exception):
  pass


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
  cfg = tiny_run_config()
  ref_dir = str(tmp_path / "ref")
  ref = pipeline.run(cfg, ref_dir, progress=False)
  assert [(r["phase"], r["grow_step"], r["improve_step"]) for r in ref["rows"]] == [
      ("bc", 0, 0), ("improve", 1, 1), ("improve", 1, 2), ("improve", 2, 1), ("improve", 2, 2)]
  summary = json.load(open(os.path.join(ref_dir, "summary.json")))
  assert set(summary) == {"rows", "wall_time_s", "reward_hacking", "reward_hacking_suspected",
                          "reward_hacking_tolerance"}
  assert set(summary["rows"][0]) == {"phase", "grow_step", "improve_step", "threshold",
                                     "train_examples", "eval_reward", "eval_exact_match",
                                     "eval_independent", "eval_independent_se",
                                     "independent_metric", "test_reward", "test_exact_match",
                                     "test_independent", "test_independent_se",
                                     "samples_drawn", "sampled_tokens", "trained_tokens",
                                     "flops"}
  # Cumulative cost: Grow g draws samples, every phase trains; counts only grow.
  drawn = [r["samples_drawn"] for r in summary["rows"]]
  assert drawn[0] == 0 and drawn[1] > 0 and drawn[1] == drawn[2] < drawn[3] == drawn[4]
  assert all(a["flops"] < b["flops"] for a, b in zip(summary["rows"], summary["rows"][1:]))
  assert summary["rows"][0]["independent_metric"] == "bleu"  # The monitor of a chrF reward.
  assert os.path.exists(os.path.join(ref_dir, "report", "eval_reward.png"))
  assert os.path.exists(os.path.join(ref_dir, "report", "grow_g001_rewards.png"))
  # Improve never ends below the policy it started from (the start is an eval candidate).
  rewards = [r["eval_reward"] for r in ref["rows"]]
  assert all(b >= a for a, b in zip(rewards, rewards[1:]))

  # Crash 1: in the middle of Improve g1 i2 (after its step-4 checkpoint).
  work = str(tmp_path / "resumed")
  real_step = improve.Trainer.train_step
  calls = {"n": 0}

  def crashing_step(self, state, batch):
    calls["n"] += 1
    if calls["n"] == 12 + 8 + 6:  # BC 12 steps, g1 i1 8 steps, then step 6 of g1 i2.
      raise Crash("simulated preemption in Improve")
    return real_step(self, state, batch)

  monkeypatch.setattr(improve.Trainer, "train_step", crashing_step)
  with pytest.raises(Crash):
    pipeline.run(cfg, work, progress=False)
  monkeypatch.setattr(improve.Trainer, "train_step", real_step)
  assert os.path.exists(os.path.join(work, "phases", "g001_i01.json"))
  assert not os.path.exists(os.path.join(work, "phases", "g001_i02.json"))

  # Crash 2: in the middle of Grow g2 (after its first chunk).
  real_write = growdata.GrowWriter.write_chunk

  def crashing_write(self, chunk_index, records):
    if "g002" in self.directory and chunk_index == 2:
      raise Crash("simulated preemption in Grow")
    return real_write(self, chunk_index, records)

  monkeypatch.setattr(growdata.GrowWriter, "write_chunk", crashing_write)
  with pytest.raises(Crash):
    pipeline.run(cfg, work, progress=False)
  monkeypatch.setattr(growdata.GrowWriter, "write_chunk", real_write)
  assert len(growdata.GrowWriter(os.path.join(work, "grow", "g002")).completed_chunks()) == 2
  assert not growdata.is_complete(os.path.join(work, "grow", "g002"))

  resumed = pipeline.run(cfg, work, progress=False)
  assert resumed["rows"] == ref["rows"]
  assert _records(work) == _records(ref_dir)
  for a, b in zip(_final_params(work, cfg), _final_params(ref_dir, cfg)):
    np.testing.assert_array_equal(a, b)
  # A finished run reruns as a no-op with the same summary and wall time.
  wall = json.load(open(os.path.join(work, "summary.json")))["wall_time_s"]
  rerun = pipeline.run(cfg, work, progress=False)
  assert rerun["rows"] == ref["rows"] and rerun["wall_time_s"] == wall


def test_workdir_of_another_config_is_refused_and_untouched(tmp_path):
  cfg = tiny_run_config()
  work = str(tmp_path / "w")
  Workdir(work).record_config(cfg, "# gin text")
  before = {f: open(os.path.join(work, f), "rb").read() for f in os.listdir(work)}
  other = dataclasses.replace(cfg, num_grow_steps=3)
  with pytest.raises(RestJaxError, match="num_grow_steps: 2 in the workdir, 3 now"):
    pipeline.run(other, work, progress=False)
  after = {f: open(os.path.join(work, f), "rb").read() for f in os.listdir(work)}
  assert before == after
