"""Re-scoring stored Grow data (`rest-jax rescore`): versioned side files, immutable chunks, the
manifest and per-version stats, resume after a failing reward, sharding across processes, the
readers of a version (schedules, selection, Improve batches), and the bad-input errors."""

import dataclasses
import shutil

import numpy as np
import pytest

from rest_jax import rewards, storage
from rest_jax.cli import main as cli
from rest_jax.config import GrowConfig, RunConfig, SamplingConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.grow import integrity, versions
from rest_jax.grow.fake import FakeSampler
from rest_jax.grow.rewards import StreamedGrowRewards
from rest_jax.grow.step import run_grow
from rest_jax.improve import batches, selected, selection
from rest_jax.improve.schedules import Threshold
from rest_jax.pipeline import build, rescore
from rest_jax.pipeline.workdir import Workdir
from rest_jax.tasks import data, get_task

CONFIG = RunConfig(task="arith_small", reward="exact_match", input_len=12, target_len=8,
                   grow=GrowConfig(sampling=SamplingConfig(num_samples=2, max_decode_len=8,
                                                           batch_size=8), chunk_size=8))


def _sample(vocab):
  """Sample 0 of a problem is its answer; sample 1 the answer with its last digit dropped."""
  def fn(prompt, e, k):
    text = vocab.decode(list(prompt))
    return vocab.encode(text if k == 0 else text[:-1] or "0")
  return fn


@pytest.fixture(scope="module")
def prompts():
  task = get_task("arith_small")
  out = data.examples(task, "train", input_len=12, target_len=8)[:20]
  # The fake sampler echoes its "prompt": make it the answer so that sample 0 is correct.
  return [dict(p, inputs=p["targets"][:-1]) for p in out], task


def _exact(sources, hyps, refs):
  return rewards.score(rewards.ExactMatch(), "exact_match", sources, hyps, refs)


@pytest.fixture(scope="module")
def template(tmp_path_factory, prompts):
  """A workdir with two finalized Grow sets of 20 arith_small prompts x 2 samples (3 chunks)."""
  examples, task = prompts
  wd = Workdir(str(tmp_path_factory.mktemp("template") / "run"))
  wd.record_config(CONFIG, "")
  vocab = task.output_features["targets"].vocabulary
  for g in (1, 2):
    directory = wd.grow_dir(g)
    run_grow(sampler=FakeSampler(2, sample_fn=_sample(vocab)), params=None, prompts=examples,
             reward=_exact, vocab=vocab, writer=growdata.GrowWriter(directory), grow_step=g,
             seed=0, config=CONFIG.grow, input_len=12, target_len=8, progress=False)
    growdata.index_chunks(directory, host_id=0, num_hosts=1)
    growdata.finalize(directory)
  return wd.root


@pytest.fixture()
def workdir(tmp_path, template):
  shutil.copytree(template, tmp_path / "run")
  return Workdir(str(tmp_path / "run"))


def _chrf_of(directory, refs):
  out = []
  for r in growdata.read_records(directory):
    ref = r.targets_pretokenized if r.is_original else refs[r.example_id]
    out.append(float(rewards.score(rewards.ChrF(), "chrf", [r.inputs_pretokenized],
                                   [r.targets_pretokenized], [ref])[0]))
  return np.asarray(out, np.float32)


def test_rescore_writes_a_version_beside_immutable_chunks(workdir, prompts):
  before = {d: growdata.read_stats(d) for _, d in workdir.grow_steps()}
  result = rescore.rescore_workdir(workdir.root, spec="chrf", name="chrF")
  assert result["version"] == 1
  refs = {int(p["example_id"]): p["targets_pretokenized"] for p in prompts[0]}
  for _, d in workdir.grow_steps():
    stats = growdata.read_stats(d)
    assert stats == before[d]  # stats.json, index and chunks untouched.
    integrity.check_manifest(d, stats)
    index = growdata.load_index(d)
    values = versions.index_rewards(d, index, 1)
    np.testing.assert_allclose(values, _chrf_of(d, refs), rtol=1e-6)
    assert not np.array_equal(values, index["reward"])
    entry = versions.complete_versions(d)[1]
    assert entry["reward"] == "chrf" and entry["name"] == "chrF"
    assert entry["records"] == stats.count and entry["chunks"] == len(stats.chunks)
    v1 = versions.version_stats(d, 1)
    assert v1.mean == pytest.approx(values[~index["is_original"]].mean())
    assert StreamedGrowRewards(d, 1).mean == v1.mean
    assert StreamedGrowRewards(d, 1).quantiles([0.5]) == pytest.approx(
        [np.quantile(values[~index["is_original"]], 0.5)])
  assert rescore.rescore_workdir(workdir.root, spec="exact_match")["version"] == 2
  assert sorted(versions.complete_versions(workdir.grow_dir(1))) == [1, 2]


def test_a_failing_reward_keeps_versions_and_the_rerun_continues(workdir):
  rescore.rescore_workdir(workdir.root, spec="chrf")
  d = workdir.grow_dir(1)
  v1 = versions.index_rewards(d, growdata.load_index(d), 1)
  calls, alive = [], []

  def dies(sources, hyps, refs):  # A reward server that dies on the third chunk.
    calls.append(len(hyps))
    if len(calls) == 3 and not alive:
      raise RestJaxError("reward server died")
    return _exact(sources, hyps, refs)

  with pytest.raises(RestJaxError, match="died"):
    rescore.rescore_workdir(workdir.root, spec="exact_match", reward=dies)
  manifest = versions.read_manifest(d)["versions"]
  assert manifest["1"]["status"] == "complete" and manifest["2"]["status"] == "pending"
  np.testing.assert_array_equal(versions.index_rewards(d, growdata.load_index(d), 1), v1)
  with pytest.raises(RestJaxError, match="reward version 2 is not recorded"):
    versions.require_version(d, 2)
  done = len(calls) - 1
  calls.clear()
  alive.append(True)
  assert rescore.rescore_workdir(workdir.root, spec="exact_match", reward=dies)["version"] == 2
  total = sum(len(growdata.read_stats(x).chunks) for _, x in workdir.grow_steps())
  assert len(calls) == total - done  # Only the chunks without a side file were scored.
  index = growdata.load_index(d)
  np.testing.assert_array_equal(versions.index_rewards(d, index, 2), index["reward"])


def test_processes_score_their_own_chunks(workdir, monkeypatch):
  read = {0: [], 1: []}
  host = [0]
  original = growdata.read_records
  monkeypatch.setattr(growdata, "read_records", lambda d, files=None: (
      read[host[0]].extend(files), original(d, files=files))[1])

  def barrier(name):  # Host 1 runs while host 0 waits at the barrier after starting the version.
    if name == "rescore version started":
      host[0] = 1
      rescore.rescore_workdir(workdir.root, spec="chrf", host_id=1, num_hosts=2)
      assert not versions.complete_versions(workdir.grow_dir(1))  # Host 0 records it.
      host[0] = 0

  rescore.rescore_workdir(workdir.root, spec="chrf", host_id=0, num_hosts=2, barrier=barrier)
  chunks = [c for _, d in workdir.grow_steps() for c in sorted(growdata.read_stats(d).chunks)]
  theirs = {c for _, d in workdir.grow_steps() for c in sorted(growdata.read_stats(d).chunks)[1::2]}
  assert set(read[1]) == theirs and set(read[0]) == set(chunks) - theirs  # No chunk read twice.
  assert len(read[0]) + len(read[1]) == len(chunks)
  assert all(1 in versions.complete_versions(d) for _, d in workdir.grow_steps())


def test_selection_and_batches_read_the_version(workdir, tmp_path):
  rescore.rescore_workdir(workdir.root, spec="chrf")
  d = workdir.grow_dir(1)
  index = growdata.load_index(d)
  values = versions.index_rewards(d, index, 1)
  tau = Threshold(float(np.quantile(values, 0.5)))
  mixture = selection.select_mixture([d], threshold=tau, reward_version=1)
  np.testing.assert_array_equal(mixture.keep[0], (values >= tau.value) | index["is_original"])
  picked = selected.select_to_disk([d], str(tmp_path / "sel"), selected.Rules(
      threshold=tau, reward_version=1))
  assert picked.count == mixture.count
  loader = batches.ImproveBatches(picked, batch_size=picked.count, seed=0,
                                  rows=slice(None), input_len=12, target_len=8)
  batch = loader.batch(0)
  assert (batch["reward"][batch["is_original"] == 0] >= tau.value).all()
  by_key = dict(zip(zip(index["example_id"].tolist(), index["sample_idx"].tolist()), values))
  kept = [by_key[k] for k in by_key if k[1] >= 0 and by_key[k] >= tau.value]
  assert sorted(batch["reward"][batch["is_original"] == 0]) == pytest.approx(sorted(kept))


def test_nan_reward_is_one_line_error(workdir):
  nan = build.reward_call(lambda s, h, r: np.full(len(h), np.nan), "py:bad:nan")
  with pytest.raises(RestJaxError, match="non-finite") as e:
    rescore.rescore_workdir(workdir.root, spec="py:bad:nan", reward=nan)
  assert "\n" not in str(e.value)
  assert not versions.complete_versions(workdir.grow_dir(1))


def test_unknown_reward_is_one_line_error(workdir, capsys):
  assert cli.main(["rescore", workdir.root, "--reward", "no_such_reward"]) == 2
  err = capsys.readouterr().err.strip()
  assert "reward 'no_such_reward' is unknown" in err and "\n" not in err


def test_unknown_version_is_one_line_error(workdir):
  with pytest.raises(RestJaxError, match="reward_version = 3 is not recorded") as e:
    rescore.recorded_spec(workdir, 3)
  assert "\n" not in str(e.value) and "rest-jax rescore" in str(e.value)
  with pytest.raises(RestJaxError, match="reward version 3 is not recorded"):
    StreamedGrowRewards(workdir.grow_dir(1), 3)
  with pytest.raises(RestJaxError, match="reward_version must be >= 0"):
    RunConfig(improve=dataclasses.replace(RunConfig().improve, reward_version=-1))


def test_cli_rescore_prints_each_grow_set(workdir, capsys):
  assert cli.main(["rescore", workdir.root, "--reward", "chrf", "--name", "c"]) == 0
  out = capsys.readouterr().out
  assert out.count("reward version 1 (chrf)") == 2
  assert storage.exists(storage.join(workdir.grow_dir(2), versions.MANIFEST))
  from rest_jax.cli import inspection  # pylint: disable=import-outside-toplevel
  assert inspection.describe(workdir.root, num_examples=0).count("reward version 1 (c: chrf)") == 2


def test_a_runs_new_grow_set_gets_the_version_it_reads(workdir, prompts):
  rescore.rescore_workdir(workdir.root, spec="chrf", name="c")
  g3 = workdir.grow_dir(3)
  shutil.copytree(workdir.grow_dir(2), g3)
  storage.remove(storage.join(g3, versions.MANIFEST))  # A Grow set the run just made.
  for name in storage.listdir(g3):
    if ".rewards-v" in name:
      storage.remove(storage.join(g3, name))
  rescore.ensure_version(workdir, g3, 1, prompts=prompts[0], host_id=0, num_hosts=1,
                         barrier=lambda name: None)
  entry = versions.complete_versions(g3)[1]
  assert (entry["reward"], entry["name"]) == ("chrf", "c")
  assert versions.version_stats(g3, 1) == versions.version_stats(workdir.grow_dir(2), 1)


def test_value_data_carries_the_version(workdir, prompts):
  rescore.rescore_workdir(workdir.root, spec="chrf")
  d = workdir.grow_dir(1)
  index = growdata.load_index(d)
  values = dict(zip(zip(index["example_id"].tolist(), index["sample_idx"].tolist()),
                    versions.index_rewards(d, index, 1).tolist()))
  dataset = selection.value_dataset(d, include_originals=True, reward_version=1,
                                    output_features=prompts[1].output_features)
  seen = {(int(ex["example_id"]), int(ex["sample_idx"])): float(ex["reward"])
          for ex in dataset.as_numpy_iterator()}
  assert seen == pytest.approx(values)
