"""The pipeline's ReST / ReST-EM options with the heavy parts faked (no model is trained or sampled):
which policy each Improve step starts from (restart_from_base), which TrainConfig it gets
(patience), and the schedule + data mixture wiring on fabricated Grow sets."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types

import numpy as np

import pytest

from rest_jax import config as C
from rest_jax import tasks
from rest_jax.errors import RestJaxError
from rest_jax.tasks import data
from rest_jax.improve import losses, schedules, selected
from rest_jax.grow.dataset import GrowRecord
from rest_jax.pipeline import build, phases
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.reporting import Reporter


def _records(grow_step: int) -> list[GrowRecord]:
  out = []
  for e in range(6):
    for s in range(-1, 4):
      reward = 1.0 if s == -1 else ((e * 5 + s * 3 + grow_step) % 9) / 8
      targets = [20 + (e + s) % 3, 1] if s >= 0 else [30 + e, 1]  # Repeats within a prompt.
      out.append(GrowRecord(e, s, [10 + e, 1], targets, f"x{e}", f"y{targets}", reward,
                            [-1.0] * len(targets), s == -1, grow_step))
  return out


def _config(restart: bool) -> C.RunConfig:
  return C.RunConfig(
      task="numbers_de_en_small", reward="chrf", num_grow_steps=2, num_improve_steps=2,
      bc=C.TrainConfig(num_steps=5, patience=0),
      improve=C.ImproveConfig(train=C.TrainConfig(num_steps=7, patience=2),
                              restart_from_base=restart, schedule="per_source_interpolation",
                              schedule_params=C.ScheduleParams(gammas=(0.0, 0.5)),
                              mix_previous_grows=1, deduplicate=True, max_per_prompt=3))


@pytest.fixture
def fake(monkeypatch):
  calls = {"train": [], "grow": []}
  task = tasks.get_task("numbers_de_en_small")

  def fake_build(config, workdir, progress):
    parts = build.Parts(config=config, layout=None, graphdef=None, abstract_params=None,
                        bc_loss=losses.make_loss(config.bc),
                        improve_loss=losses.make_loss(config.improve.train),
                        schedule=schedules.from_config(config.improve),
                        grow_sampler=types.SimpleNamespace(place_params=lambda params: params))
    return build.Run(parts=parts, workdir=workdir, task=task, vocab=None, reward=None,
                     eval_fn=None, reporter=Reporter(workdir), base_params="params-init",
                     progress=progress)

  def train(run, name, *, params, cfg, loss, seed, lr_scale, dataset=None, improve_set=None,
            extras=None):
    count = 0 if dataset is None else sum(1 for _ in dataset.as_numpy_iterator())
    if improve_set is not None:  # The records in the files each host's loader reads.
      count = sum(os.path.getsize(improve_set.bucket_path(b)) // selected.SELECTED_ROW.itemsize
                  for b in range(len(improve_set.bucket_counts)))
    calls["train"].append({"name": name, "start": params, "cfg": cfg, "count": count})
    return f"params-{name}", {"eval_reward": 0.5, "eval_exact_match": 0.0,
                              "eval_independent": 0.25}

  def grow(*, params, writer, grow_step, **unused):
    calls["grow"].append((grow_step, params))
    writer.write_chunk(0, _records(grow_step))

  monkeypatch.setattr(build, "build", fake_build)
  monkeypatch.setattr(build.Run, "restore_best", lambda self, name: f"params-{name}")
  monkeypatch.setattr(phases, "_train", train)
  monkeypatch.setattr(phases, "_grow_prompts", lambda run: [])
  monkeypatch.setattr(phases, "run_grow", grow)
  monkeypatch.setattr(data, "task_dataset", lambda *args, **kwargs: None)
  return calls


@pytest.mark.parametrize("restart", [False, True])
def test_improve_start_policy_and_config(tmp_path, fake, restart):
  cfg = _config(restart)
  work = str(tmp_path / "w")
  result = pipeline.run(cfg, work, progress=False)
  starts = {c["name"]: c["start"] for c in fake["train"]}
  assert starts == {
      "bc": "params-init", "g001_i01": "params-bc", "g001_i02": "params-g001_i01",
      "g002_i01": "params-bc" if restart else "params-g001_i02", "g002_i02": "params-g002_i01"}
  # Grow always samples the latest policy, also under ReST-EM.
  assert fake["grow"] == [(1, "params-bc"), (2, "params-g001_i02")]
  # Every Improve phase trains with the Improve TrainConfig (its patience gates the phase).
  assert [c["cfg"] for c in fake["train"]] == [cfg.bc] + [cfg.improve.train] * 4
  assert all(c["cfg"].patience == 2 for c in fake["train"][1:])
  # The rows carry the schedule's (mean per-source) threshold and the mixture's size, which is
  # what the dataset handed to training holds.
  rows = result["rows"]
  assert [r["train_examples"] for r in rows[1:]] == [c["count"] for c in fake["train"][1:]]
  assert all(r["eval_independent"] == 0.25 and r["independent_metric"] == "bleu" for r in rows)
  assert rows[3]["train_examples"] > rows[1]["train_examples"] > 0  # g2 also mixes g1 in.
  # per_source_interpolation, gammas (0, 0.5), computed here from the fabricated rewards: per
  # prompt tau = mean + gamma (max - mean) over its samples; the row shows the mean over prompts.
  samples = np.asarray([[r.reward for r in _records(1) if r.example_id == e and r.sample_idx >= 0]
                        for e in range(6)])
  means, maxes = samples.mean(axis=1), samples.max(axis=1)
  expected = [float(np.mean(means + g * (maxes - means))) for g in (0.0, 0.5)]
  assert [r["threshold"] for r in rows[1:3]] == pytest.approx(expected)
  assert expected[1] > expected[0]
  summary = json.load(open(os.path.join(work, "summary.json")))
  assert summary["reward_hacking_suspected"] is False
  if restart:
    # Resuming: finished phases are not rerun; g2's restart restores BC from its checkpoint.
    for name in ("g002_i01", "g002_i02"):
      os.remove(os.path.join(work, "phases", f"{name}.json"))
    fake["train"].clear()
    pipeline.run(cfg, work, progress=False)
    assert [(c["name"], c["start"]) for c in fake["train"]] == [
        ("g002_i01", "params-bc"), ("g002_i02", "params-g002_i01")]


def test_prompt_filters_reach_the_selection(tmp_path, fake):
  """ImproveConfig.drop_all_pass / drop_all_fail are wired through phases.improve: at threshold
  0.9 prompts 0, 1, 3 and 4 of the fabricated Grow set have no sample with reward 1.0 (all
  fail), so drop_all_fail leaves prompts 2 and 5 (their originals and passing samples)."""
  base = _config(False)
  counts = {}
  for drop in (False, True):
    cfg = dataclasses.replace(base, num_grow_steps=1, num_improve_steps=1,
                              improve=C.ImproveConfig(train=base.improve.train, thresholds=(0.9,),
                                                      drop_all_fail=drop))
    rows = pipeline.run(cfg, str(tmp_path / f"w{drop}"), progress=False)["rows"]
    counts[drop] = rows[1]["train_examples"]
  assert counts == {False: 6 + 3, True: 2 + 3}
  assert [c["count"] for c in fake["train"] if c["name"] != "bc"] == [9, 5]


def even_prompts(sources, hypotheses, references):
  """A re-scoring reward (py:test_pipeline_options:even_prompts): 1 for every record of an
  even prompt ("x0", "x2", ...), else 0."""
  del hypotheses, references
  return np.asarray([1.0 if int(s[1:]) % 2 == 0 else 0.0 for s in sources])


def test_a_run_trains_on_a_rescored_reward_version(tmp_path, fake, monkeypatch):
  """ImproveConfig.reward_version reaches the schedule, the selection and the rows, and a Grow
  set the run makes gets the version (scored with the recorded reward) before its Improve."""
  from rest_jax.grow import versions  # pylint: disable=import-outside-toplevel
  from rest_jax.pipeline import rescore  # pylint: disable=import-outside-toplevel
  base = _config(False)
  cfg = dataclasses.replace(base, num_grow_steps=1, num_improve_steps=1,
                            improve=C.ImproveConfig(train=base.improve.train, thresholds=(0.5,)))
  first = tmp_path / "w0"
  pipeline.run(cfg, str(first), progress=False)
  monkeypatch.setattr(rescore, "task_references", lambda config, ids: {e: "r" for e in ids})
  assert rescore.rescore_workdir(str(first), spec="py:test_pipeline_options:even_prompts",
                                 name="even")["version"] == 1
  second = tmp_path / "w1"  # A new run from a copy of the BC phase and the rescored Grow set.
  (second / "phases").mkdir(parents=True)
  shutil.copy(first / "phases" / "bc.json", second / "phases")
  shutil.copytree(first / "grow", second / "grow")
  monkeypatch.setattr(phases, "_grow_prompts", lambda run: [
      {"example_id": e, "targets_pretokenized": "r"} for e in range(6)])
  cfg = dataclasses.replace(cfg, num_grow_steps=2, improve=dataclasses.replace(
      cfg.improve, reward_version=1))
  rows = pipeline.run(cfg, str(second), progress=False)["rows"]
  # Version 1: every record of prompts 0, 2, 4 has reward 1 (mean 0.5 = tau), the others 0:
  # 3 prompts x (4 samples + the original) pass, in both Grow sets.
  assert [(r["threshold"], r["train_examples"]) for r in rows[1:]] == [(0.5, 15), (0.5, 15)]
  entry = versions.complete_versions(str(second / "grow" / "g002"))[1]
  assert (entry["name"], entry["stats"]["mean"]) == ("even", 0.5)
  with pytest.raises(RestJaxError, match="reward_version = 2 is not recorded"):
    pipeline.run(dataclasses.replace(cfg, improve=dataclasses.replace(
        cfg.improve, reward_version=2)), str(tmp_path / "w2"), progress=False)
