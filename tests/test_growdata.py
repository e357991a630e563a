"""Grow dataset: crash-safe chunked writes, stats, the unfiltered reader (selected through
improve.selection), batches, inspection."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from rest_jax import tasks

from rest_jax.tasks import data

from rest_jax.grow import dataset as growdata

from rest_jax.grow import stats as growstats

from rest_jax.improve import selection
from rest_jax.cli import inspection
from rest_jax.errors import RestJaxError
from rest_jax.grow.dataset import GrowRecord, GrowWriter
from rest_jax.improve.schedules import Threshold

FEATURES = tasks.ENCDEC_FEATURES
NUM_SAMPLES = 3
PROMPTS_PER_CHUNK = 4


def _record(example_id: int, sample_idx: int, reward: float) -> GrowRecord:
  n = 1 + (example_id + sample_idx) % 4
  return GrowRecord(
      example_id=example_id, sample_idx=sample_idx, inputs=[10 + example_id % 7, 11, 1],
      targets=list(range(20, 20 + n - 1)) + [1], inputs_pretokenized=f"src {example_id}",
      targets_pretokenized=f"hyp {example_id}/{sample_idx}", reward=reward,
      behaviour_logprobs=-0.25 * np.arange(1, n + 1), is_original=sample_idx == -1, grow_step=1)


def _reward(example_id: int, sample_idx: int) -> float:
  """Deterministic sample rewards on a 1/64 grid (exact in float32), with ties; originals 1."""
  if sample_idx == -1:
    return 1.0
  return ((example_id * 7 + (sample_idx + 1) * 13) % 65) / 64


def _chunk(k: int) -> list[GrowRecord]:
  return [_record(e, s, _reward(e, s))
          for e in range(k * PROMPTS_PER_CHUNK, (k + 1) * PROMPTS_PER_CHUNK)
          for s in range(-1, NUM_SAMPLES)]


H0_TEMP = ".chunk-h000-00001.tfrecord.0a1b2c3d.tmp"
H1_TEMP = ".chunk-h001-00000.tfrecord.deadbeef.tmp"


def _write_with_crash(directory: str) -> None:
  """Host 0 writes chunks 0 and 2, crashes while writing chunk 1; host 1 crashes too."""
  writer = GrowWriter(directory, host_id=0)
  writer.write_chunk(0, _chunk(0))
  writer.write_chunk(2, _chunk(2))
  for name in (H0_TEMP, H1_TEMP):  # What storage.atomic_path leaves when the process dies.
    with open(os.path.join(directory, name), "wb") as f:
      f.write(b"half a chunk")


@pytest.fixture(scope="module")
def grow_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("work") / "grow" / "g001")
  _write_with_crash(directory)
  with pytest.raises(RestJaxError, match="unfinished chunk writes"):
    growdata.finalize(directory)
  resumed = GrowWriter(directory, host_id=0)  # Removes host 0's stale .tmp, not host 1's.
  assert resumed.completed_chunks() == {0, 2}
  assert sorted(os.listdir(directory)) == sorted(["chunk-h000-00000.tfrecord",
                                                  "chunk-h000-00002.tfrecord", H1_TEMP])
  for k in sorted({0, 1, 2} - resumed.completed_chunks()):
    resumed.write_chunk(k, _chunk(k))
  host1 = GrowWriter(directory, host_id=1)
  assert host1.completed_chunks() == set()
  host1.write_chunk(0, _chunk(3))
  growdata.finalize(directory)
  return directory


def _expected_records() -> list[GrowRecord]:
  return [r for k in range(4) for r in _chunk(k)]


def _read_all(task) -> list[dict]:
  return list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())


def test_every_record_once_after_resume(grow_dir):
  task = growdata.grow_task(grow_dir, output_features=FEATURES)
  rows = _read_all(task)
  keys = [(int(r["example_id"]), int(r["sample_idx"])) for r in rows]
  expected = _expected_records()
  assert len(keys) == len(set(keys)) == len(expected) == 64
  assert set(keys) == {(r.example_id, r.sample_idx) for r in expected}
  by_key = {(r.example_id, r.sample_idx): r for r in expected}
  for row in rows:
    want = by_key[(int(row["example_id"]), int(row["sample_idx"]))]
    assert row["inputs"].dtype == np.int32 and row["targets"].tolist() == list(want.targets)
    assert row["inputs"].tolist() == list(want.inputs)
    np.testing.assert_array_equal(row["behaviour_logprobs"], np.float32(want.behaviour_logprobs))
    assert row["reward"] == np.float32(want.reward)
    assert bool(row["is_original"]) == want.is_original and row["grow_step"] == 1
    assert row["targets_pretokenized"].decode() == want.targets_pretokenized


def test_completed_chunk_never_rewritten(grow_dir, tmp_path):
  directory = str(tmp_path / "g")
  writer = GrowWriter(directory)
  path = writer.write_chunk(0, _chunk(0))
  before = open(path, "rb").read()
  with pytest.raises(RestJaxError, match="already complete"):
    writer.write_chunk(0, _chunk(1))
  assert open(path, "rb").read() == before
  with pytest.raises(RestJaxError, match="already finalized"):
    GrowWriter(grow_dir, host_id=0).write_chunk(7, _chunk(1))


def test_stats_against_numpy(grow_dir):
  stats = growdata.read_stats(grow_dir)
  expected = _expected_records()
  rewards = np.asarray([np.float32(r.reward) for r in expected], dtype=np.float64)
  original = np.asarray([r.is_original for r in expected])
  samples = rewards[~original]
  assert (stats.count, stats.num_samples, stats.num_originals) == (64, 48, 16)
  assert stats.mean == pytest.approx(samples.mean(), abs=1e-12)
  assert stats.mean_all == pytest.approx(rewards.mean(), abs=1e-12)
  assert stats.std == pytest.approx(samples.std(), abs=1e-12)
  assert (stats.min, stats.max) == (samples.min(), samples.max())
  for q in growstats.QUANTILES:
    assert stats.quantiles[str(q)] == pytest.approx(np.quantile(samples, q), abs=1e-12)
  counts, edges = np.histogram(samples, bins=20, range=(0, 1))
  assert stats.histogram["counts"] == counts.tolist()
  np.testing.assert_allclose(stats.histogram["edges"], edges)
  assert sum(c["records"] for c in stats.chunks.values()) == 64 and stats.grow_step == 1
  assert growdata.is_complete(grow_dir)
  assert growdata.finalize(grow_dir) == stats  # Idempotent.


def _select(directory: str, threshold: float, **kw) -> selection.Mixture:
  return selection.select_mixture([directory], threshold=Threshold(threshold), **kw)


def _read_selected(mix: selection.Mixture) -> list[dict]:
  dataset = selection.improve_dataset(mix, output_features=FEATURES)
  return list(dataset.as_numpy_iterator())


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("include_originals", [True, False])
def test_threshold_counts_against_numpy(grow_dir, threshold, include_originals):
  expected = _expected_records()
  want = sum(np.float32(r.reward) >= np.float32(threshold)
             and (include_originals or not r.is_original) for r in expected)
  assert want > 0
  mix = _select(grow_dir, threshold, include_originals=include_originals)
  assert mix.count == want
  if threshold in (0.5, 0.9):  # Reading back is slower; two thresholds suffice.
    rows = _read_selected(mix)
    assert len(rows) == want
    assert all(r["reward"] >= threshold for r in rows)
    assert include_originals or not any(r["is_original"] for r in rows)


def test_max_per_prompt_by_hand(tmp_path):
  directory = str(tmp_path / "g")
  sample_rewards = {0: [0.875, 0.5, 0.875, 0.25], 1: [0.125, 0.75, 0.5, 0.625]}
  records = [_record(e, s, r) for e, rs in sample_rewards.items() for s, r in enumerate(rs)]
  records += [_record(0, -1, 1.0), _record(1, -1, 0.25)]
  GrowWriter(directory).write_chunk(0, records)
  growdata.finalize(directory)

  def selected(threshold, **kw):
    mix = _select(directory, threshold, **kw)
    keys = sorted((int(r["example_id"]), int(r["sample_idx"])) for r in _read_selected(mix))
    assert mix.count == len(keys)
    return keys

  # Best samples per prompt, ties by lower sample_idx; originals are not capped.
  assert selected(0.3, max_per_prompt=1) == [(0, -1), (0, 0), (1, 1)]
  assert selected(0.3, max_per_prompt=2) == [(0, -1), (0, 0), (0, 2), (1, 1), (1, 3)]
  assert selected(0.3, max_per_prompt=2, include_originals=False) == [
      (0, 0), (0, 2), (1, 1), (1, 3)]
  assert selected(0.0, max_per_prompt=3) == [
      (0, -1), (0, 0), (0, 1), (0, 2), (1, -1), (1, 1), (1, 2), (1, 3)]
  with pytest.raises(RestJaxError) as info:
    _select(directory, 0.9, include_originals=False)
  assert "0.9" in str(info.value) and "0.8750" in str(info.value) and "Lower the threshold" in str(
      info.value)


def test_reader_is_unfiltered_and_value_data_comes_through_the_selection(grow_dir):
  # The reader yields every record in chunk-file order; the value network's data is the same
  # records and order, without the originals when they are left out.
  order = [(r.example_id, r.sample_idx) for r in growdata.read_records(grow_dir)]
  rows = _read_all(growdata.grow_task(grow_dir, output_features=FEATURES))
  assert [(int(r["example_id"]), int(r["sample_idx"])) for r in rows] == order
  for include_originals in (True, False):
    dataset = selection.value_dataset(grow_dir, include_originals=include_originals,
                                      output_features=FEATURES)
    got = [(int(r["example_id"]), int(r["sample_idx"])) for r in dataset.as_numpy_iterator()]
    assert got == [k for k in order if include_originals or k[1] != -1]


def test_corrupt_chunks(tmp_path):
  directory = str(tmp_path / "g")
  writer = GrowWriter(directory)
  path = writer.write_chunk(0, _chunk(0))
  writer.write_chunk(1, _chunk(1))
  good = open(path, "rb").read()
  with open(path, "wb") as f:  # Truncated before finalize.
    f.write(good[:-9])
  with pytest.raises(RestJaxError) as info:
    growdata.finalize(directory)
  assert "chunk-h000-00000.tfrecord" in str(info.value) and "Delete" in str(info.value)
  assert not growdata.is_complete(directory)
  with open(path, "wb") as f:  # Garbage.
    f.write(b"\x00garbage" * 40)
  with pytest.raises(RestJaxError, match="chunk-h000-00000.tfrecord"):
    growdata.verify_chunks(directory)
  with open(path, "wb") as f:
    f.write(good)
  growdata.finalize(directory)
  with open(path, "wb") as f:  # Truncated after finalize: caught by the manifest.
    f.write(good[:-9])
  with pytest.raises(RestJaxError, match="chunk-h000-00000.tfrecord.*bytes"):
    growdata.grow_task(directory, output_features=FEATURES)
  corrupt = bytearray(good)  # Same size, flipped bytes: caught by the manifest's checksum.
  corrupt[len(good) // 2:len(good) // 2 + 8] = b"\xff" * 8
  with open(path, "wb") as f:
    f.write(bytes(corrupt))
  with pytest.raises(RestJaxError, match=r"chunk-h000-00000.tfrecord has the recorded size but "
                     r"its bytes changed.*SHA-256.*Delete that chunk file"):
    growdata.grow_task(directory, output_features=FEATURES)
  stats_path = os.path.join(directory, growdata.STATS)  # A manifest from before checksums:
  stats = json.load(open(stats_path))  # the flipped bytes are caught while reading.
  assert all(len(info["sha256"]) == 64 for info in stats["chunks"].values())
  for info in stats["chunks"].values():
    del info["sha256"]
  with open(stats_path, "w") as f:
    json.dump(stats, f)
  dataset = growdata.grow_task(directory, output_features=FEATURES).get_dataset(
      None, split="train", shuffle=False)
  with pytest.raises(RestJaxError, match="corrupt"):
    for _ in data.train_batches(dataset, batch_size=64, seed=0, input_len=8, target_len=8):
      pass


def _toy_dataset(n: int) -> tf.data.Dataset:
  def gen():
    for i in range(n):
      yield {"inputs": np.arange(1, 2 + i % 3, dtype=np.int64),
             "targets": np.full(1 + i % 4, 7, np.int32), "example_id": np.int64(100 + i)}
  return tf.data.Dataset.from_generator(gen, output_signature={
      "inputs": tf.TensorSpec([None], tf.int64), "targets": tf.TensorSpec([None], tf.int32),
      "example_id": tf.TensorSpec([], tf.int64)})


def _take(iterator, k: int) -> list[dict]:
  return [next(iterator) for _ in range(k)]


def test_train_batches_deterministic_and_resumable():
  kw = dict(batch_size=4, seed=5, input_len=6, target_len=5)
  first = _take(data.train_batches(_toy_dataset(10), **kw), 9)
  again = _take(data.train_batches(_toy_dataset(10), **kw), 9)
  for a, b in zip(first, again):
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key])
  b0 = first[0]
  assert b0["inputs"].shape == (4, 6) and b0["inputs"].dtype == np.int32
  assert b0["targets"].shape == (4, 5) and b0["example_id"].dtype == np.int64
  np.testing.assert_array_equal(b0["reward"], np.ones(4, np.float32))
  np.testing.assert_array_equal(b0["is_original"], np.ones(4, np.int32))
  np.testing.assert_array_equal(b0["behaviour_logprobs"], np.zeros((4, 5), np.float32))
  i = int(b0["example_id"][0]) - 100
  assert b0["inputs"][0].tolist() == list(range(1, 2 + i % 3)) + [0] * (5 - i % 3)
  assert b0["targets"][0].tolist() == [7] * (1 + i % 4) + [0] * (4 - i % 4)
  ids = np.concatenate([b["example_id"] for b in first])
  for epoch in range(3):  # 36 ids = 3 full epochs (batches straddle them): each a permutation.
    assert sorted(ids[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(100, 110))
  assert ids[:10].tolist() != ids[10:20].tolist()  # Each epoch has its own order.
  for k in (1, 2, 3, 7):
    resumed = _take(data.train_batches(_toy_dataset(10), start_step=k, **kw), 9 - k)
    for a, b in zip(first[k:], resumed):
      for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
  other = _take(data.train_batches(_toy_dataset(10), **{**kw, "seed": 6}), 3)
  assert not all(np.array_equal(a["example_id"], b["example_id"]) for a, b in zip(first, other))


def test_train_batches_errors():
  with pytest.raises(RestJaxError, match="target_len=2"):
    next(data.train_batches(_toy_dataset(10), batch_size=4, seed=0, input_len=6, target_len=2))
  with pytest.raises(RestJaxError, match="empty"):
    data.train_batches(_toy_dataset(10).filter(lambda ex: False), batch_size=4, seed=0,
                       input_len=6, target_len=5)


def test_describe_and_export(grow_dir, tmp_path):
  workdir = os.path.dirname(os.path.dirname(grow_dir))
  os.makedirs(os.path.join(workdir, "grow", "g002"))  # An unfinished second step.
  try:
    text = inspection.describe(workdir, num_examples=2)
    stats = growdata.read_stats(grow_dir)
    assert "Grow step 1" in text and "64 records = 48 samples + 16 originals" in text
    assert f"mean {stats.mean:.4f}" in text
    assert "Grow step 2" in text and "NOT finalized" in text
    assert text.count("#") > 0 and "[0.95, 1.00]" in text
    best = max((r for r in _expected_records() if not r.is_original),
               key=lambda r: (r.reward, -r.example_id, -r.sample_idx))
    assert f'"{best.targets_pretokenized}"' in text.split("best samples:")[1].splitlines()[1]
    out = str(tmp_path / "records.jsonl")
    assert inspection.export_jsonl(workdir, out) == 64
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(rows) == 64
    assert {(r["example_id"], r["sample_idx"]) for r in rows} == {
        (r.example_id, r.sample_idx) for r in _expected_records()}
    row = next(r for r in rows if (r["example_id"], r["sample_idx"]) == (5, 1))
    assert row["reward"] == _reward(5, 1) and row["targets_pretokenized"] == "hyp 5/1"
    assert row["targets"] == list(_record(5, 1, 0.0).targets) and row["grow_step"] == 1
    assert inspection.export_jsonl(workdir, out, grow_step=1) == 64
    with pytest.raises(RestJaxError, match="no Grow step 3"):
      inspection.export_jsonl(workdir, out, grow_step=3)
  finally:
    os.rmdir(os.path.join(workdir, "grow", "g002"))
  with pytest.raises(RestJaxError, match="does not exist"):
    inspection.describe(str(tmp_path / "missing"))
  with pytest.raises(RestJaxError, match="no Grow data"):
    inspection.export_jsonl(str(tmp_path), out)


def test_inspect_export_and_value_data_never_read_the_whole_index(grow_dir, monkeypatch):
  # The per-host readers stream the per-chunk index files: with index.npz unreadable they give
  # what the whole-index readers gave (best / worst by reward, example_id, sample_idx).
  workdir = os.path.dirname(os.path.dirname(grow_dir))
  samples = [r for r in _expected_records() if not r.is_original]
  ranked = sorted(samples, key=lambda r: (-np.float32(r.reward), r.example_id, r.sample_idx))
  originals = np.asarray([r.reward for r in _expected_records() if r.is_original], np.float32)
  order = [(r.example_id, r.sample_idx) for r in growdata.read_records(grow_dir)]

  def refuse(*args, **kwargs):
    raise AssertionError("the whole Grow index was read")

  monkeypatch.setattr(growdata.integrity, "read_index_file", refuse)
  monkeypatch.setattr(growdata, "load_index", refuse)
  text = inspection.describe(workdir, num_examples=5)
  for title, picks in (("best samples:", ranked[:5]), ("worst samples:", ranked[::-1][:5])):
    lines = text.split(title)[1].splitlines()[1:6]
    assert [f'"{r.targets_pretokenized}"' in line for r, line in zip(picks, lines)] == [True] * 5
  assert f"originals: mean {float(originals.mean()):.4f}" in text
  for include_originals in (True, False):
    dataset = selection.value_dataset(grow_dir, include_originals=include_originals,
                                      output_features=FEATURES)
    got = [(int(r["example_id"]), int(r["sample_idx"])) for r in dataset.as_numpy_iterator()]
    assert got == [k for k in order if include_originals or k[1] != -1]
  mix = _select(grow_dir, 0.5, max_per_prompt=1, deduplicate=True)
  assert mix.count == len(_read_selected(mix)) > 0
  out = os.path.join(workdir, "records.jsonl")
  assert inspection.export_jsonl(workdir, out) == 64
  os.remove(out)
