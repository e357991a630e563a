"""A workdir on ``gs://``, against a real GCS API (the fake-gcs-server emulator of
tests/gcs_emulator.py): the storage layer's commit semantics, markers, one Grow dataset, orbax
checkpoints, and the start-up check of the bucket."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rest_jax import buckets, storage
from rest_jax.errors import RestJaxError
from rest_jax.grow import dataset as growdata
from rest_jax.grow.dataset import GrowRecord, GrowWriter
from rest_jax.pipeline.workdir import Workdir


def test_writes_commit_whole_objects_or_nothing(gcs_root):
  path = storage.join(gcs_root, "run", "out.json")
  with pytest.raises(RuntimeError, match="crash"):
    with storage.open_write(path) as f:
      f.write('{"half": ')
      raise RuntimeError("crash")
  assert not storage.exists(path)  # A writer that raises uploads nothing.
  storage.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with storage.atomic_path(path) as tmp:
      assert storage.is_local(tmp)  # Staged locally, uploaded in one piece.
      with open(tmp, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("crash")
  assert storage.read_json(path) == {"a": 1}  # The old object is untouched.
  assert storage.listdir(storage.join(gcs_root, "run")) == ["out.json"]


def test_overwrite_false_and_listing(gcs_root):
  chunk = storage.join(gcs_root, "grow", "chunk.tfrecord")
  storage.write_bytes(chunk, b"first", overwrite=False)
  with pytest.raises(RestJaxError, match="already exists"):
    storage.write_bytes(chunk, b"second", overwrite=False)
  with pytest.raises(RestJaxError, match="appeared while it was being written"):
    with storage.atomic_path(chunk + "2", overwrite=False) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"mine")
      storage.write_bytes(chunk + "2", b"theirs")  # Another writer commits first.
  assert storage.read_bytes(chunk) == b"first" and storage.read_bytes(chunk + "2") == b"theirs"
  storage.makedirs(storage.join(gcs_root, "grow", "sub"))
  assert storage.listdir(storage.join(gcs_root, "grow")) == ["chunk.tfrecord",
                                                             "chunk.tfrecord2", "sub"]
  assert storage.isdir(storage.join(gcs_root, "grow", "sub"))
  assert storage.listdir(storage.join(gcs_root, "missing")) == []
  assert storage.size(chunk) == 5 and storage.size(chunk + "x") is None
  storage.rmtree(storage.join(gcs_root, "grow"))
  assert storage.listdir(gcs_root) == []


def test_ranged_reads_of_an_object(gcs_root):
  """Improve reads its records by byte ranges of the Grow chunks (``chunkindex``)."""
  path = storage.join(gcs_root, "grow", "chunk-00000.tfrecord")
  storage.write_bytes(path, bytes(range(256)) * 4)
  handle = storage.open_ranged(path)
  try:
    handle.seek(1000)
    assert handle.read(6) == bytes(range(232, 238))
    handle.seek(3)
    assert handle.read(2) == bytes([3, 4])
  finally:
    handle.close()


def test_atomic_dir_uploads_its_marker_last(gcs_root):
  path = storage.join(gcs_root, "export")
  with pytest.raises(RuntimeError):
    with storage.atomic_dir(path, last=("config.json",)) as tmp:
      storage.write_json(storage.join(tmp, "config.json"), {})
      raise RuntimeError("crash")
  assert not storage.exists(storage.join(path, "config.json"))
  with storage.atomic_dir(path, last=("config.json",)) as tmp:
    assert storage.is_local(tmp)
    storage.write_json(storage.join(tmp, "config.json"), {"k": 1})
    storage.write_bytes(storage.join(tmp, "weights", "w.bin"), b"w")
  assert storage.listdir(path) == ["config.json", "weights"]
  assert storage.read_bytes(storage.join(path, "weights", "w.bin")) == b"w"
  with pytest.raises(RestJaxError, match="already exists"):
    with storage.atomic_dir(path):
      pass


def test_workdir_markers_and_state(gcs_root):
  wd = Workdir(gcs_root + "/runs/a/")
  assert wd.root == gcs_root + "/runs/a"  # A URL is kept as is (no local abspath).
  row = {"phase": "bc", "eval_reward": 0.5, "eval_exact_match": 0.0}
  wd.mark("bc", row)
  wd.mark("g001_i01", dict(row, phase="improve"))
  wd.write_state("done", 3.0)
  storage.write_json(wd.summary_path, {"rows": [row]})
  assert wd.finished_phases() == ["bc", "g001_i01"] and wd.marked("bc") == row
  assert wd.is_finished() and wd.previous_wall_time() == 3.0
  storage.write_text(wd.marker_path("g001_i02"), '{"phase": ')  # Damaged: named, one line.
  with pytest.raises(RestJaxError, match="g001_i02.json is corrupt or truncated"):
    wd.check_state_files()


def _record(example_id: int, sample_idx: int) -> GrowRecord:
  return GrowRecord(
      example_id=example_id, sample_idx=sample_idx, inputs=[10 + example_id, 11, 1],
      targets=[20 + sample_idx + 1, 1], inputs_pretokenized=f"src {example_id}",
      targets_pretokenized=f"hyp {sample_idx}", reward=(example_id + sample_idx + 1) / 16,
      behaviour_logprobs=[-0.5, -0.25], is_original=sample_idx == -1, grow_step=1)


def test_grow_dataset_written_and_read_on_gcs(gcs_root):
  directory = Workdir(gcs_root + "/run").grow_dir(1)
  for host in (0, 1):
    GrowWriter(directory, host_id=host).write_chunk(
        1, [_record(e, s) for e in range(4 * host, 4 * host + 4) for s in (-1, 0, 1)])
  assert GrowWriter(directory, host_id=1).completed_chunks() == {1}
  assert not growdata.is_complete(directory)
  stats = growdata.finalize(directory)
  assert stats.count == 24 and growdata.is_complete(directory)
  records = list(growdata.read_records(directory))
  assert sorted((r.example_id, r.sample_idx) for r in records) == \
      [(e, s) for e in range(8) for s in (-1, 0, 1)]
  index = growdata.load_index(directory)
  assert np.array_equal(np.sort(index["reward"]), np.sort([r.reward for r in records]))
  record = growdata.read_record(directory, "chunk-h001-00001.tfrecord", 10)
  assert (record.example_id, record.sample_idx) == (7, 0)
  with pytest.raises(RestJaxError, match="already finalized"):
    GrowWriter(directory, host_id=0).write_chunk(2, [_record(9, 0)])


def test_bucket_check_names_the_bucket_and_the_fix(gcs_root, gcs_emulator, monkeypatch):
  buckets.check_workdir(gcs_root + "/new/run")  # Exists, reachable: nothing to say.
  buckets.check_workdir("/local/path")
  with pytest.raises(RestJaxError, match=r"bucket gs://no-such-bucket-x does not exist.*"
                     "gcloud storage buckets create"):
    buckets.check_workdir("gs://no-such-bucket-x/run")
  with pytest.raises(RestJaxError, match="names no bucket"):
    buckets.check_workdir("gs:///run")
  with pytest.raises(RestJaxError, match="two slashes"):
    buckets.check_workdir("gs:/bucket/run")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # Nothing listens there.
  with pytest.raises(RestJaxError, match=f"cannot reach bucket {gcs_root}.*check the network"):
    buckets.check_workdir(gcs_root + "/run")
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # Real Google endpoints, and no credentials.
  with pytest.raises(RestJaxError, match=f"no usable Google Cloud credentials to reach "
                     f"{gcs_root}.*application-default login"):
    buckets.check_workdir(gcs_root + "/run")


@pytest.mark.slow  # 43 s on 2 loaded cores: orbax on the emulator, three model loads.
def test_import_and_export_on_gcs(gcs_root, capsys):
  """An HF checkpoint read from gs://, imported to gs://, exported to gs:// and read back."""
  # pylint: disable=g-import-not-at-top
  from rest_jax.checkpoints.convert import load_checkpoint
  from rest_jax.checkpoints.convert.params import host_arrays
  from rest_jax.cli import main as cli
  from rest_jax.tasks import vocabularies
  fixture = os.path.join(os.path.dirname(__file__), "testdata", "hf", "llama_gqa")
  src, dst, out = (storage.join(gcs_root, n) for n in ("hf", "ours", "export"))
  for name in os.listdir(fixture):
    storage.write_bytes(storage.join(src, name), storage.read_bytes(os.path.join(fixture, name)))
  assert cli.main(["import", "--from", "hf", src, "--to", dst]) == 0
  assert f"tokenizer hf:{dst}/tokenizer.json" in capsys.readouterr().out
  assert vocabularies.get_vocabulary(f"hf:{dst}/tokenizer.json").vocab_size > 0
  user_smoke = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin", "experiments",
                            "user_files_smoke_cpu.gin")
  config, _ = cli.parse_run_config([user_smoke, storage.join(dst, "model.gin")], [])
  assert config.init_checkpoint == f"orbax:{dst}"  # Its model.gin, read from the bucket.
  want = dict(host_arrays(load_checkpoint("hf:" + fixture)[1]))
  got = dict(host_arrays(load_checkpoint(dst)[1]))
  assert cli.main(["export", "--from", dst, "--to", "hf", out]) == 0
  back = dict(host_arrays(load_checkpoint("hf:" + out)[1]))
  assert storage.listdir(out) == ["config.json", "model.safetensors"]
  assert want.keys() == got.keys() == back.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert cli.main(["export", "--from", dst, "--to", "hf", out]) == 2  # Exists: one error.
  assert "already exists" in capsys.readouterr().err
