"""rest_jax.storage: the commit semantics readers rely on."""

from __future__ import annotations

import errno
import os
import re

import pytest

from rest_jax import storage
from rest_jax.errors import RestJaxError


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
  path = str(tmp_path / "out.json")
  with pytest.raises(RuntimeError, match="crash"):
    with storage.open_write(path) as f:
      f.write('{"half": ')
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == []  # Neither the file nor its temporary.
  storage.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with storage.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == ["out.json"]
  assert storage.read_json(path) == {"a": 1}  # The old content is untouched.


def test_overwrite_false_refuses_an_existing_file(tmp_path):
  path = str(tmp_path / "chunk.tfrecord")
  storage.write_bytes(path, b"first", overwrite=False)
  with pytest.raises(RestJaxError, match="already exists"):
    storage.write_bytes(path, b"second", overwrite=False)
  assert storage.read_bytes(path) == b"first"
  storage.write_bytes(path, b"second")  # overwrite=True (the default) replaces it.
  assert storage.read_bytes(path) == b"second"


def test_overwrite_false_refuses_a_file_that_appears_meanwhile(tmp_path):
  path = str(tmp_path / "chunk.tfrecord")
  with pytest.raises(RestJaxError, match="appeared while it was being written"):
    with storage.atomic_path(path, overwrite=False) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"mine")
      storage.write_bytes(path, b"theirs")  # Another writer commits first.
  assert storage.read_bytes(path) == b"theirs"
  assert os.listdir(tmp_path) == ["chunk.tfrecord"]


def test_temp_names_are_recognised(tmp_path):
  path = str(tmp_path / "chunk-h000-00001.tfrecord")
  with storage.atomic_path(path) as tmp:
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_path)
    with open(tmp, "wb") as f:
      f.write(b"records")
    assert storage.temp_target(name) == "chunk-h000-00001.tfrecord"
  assert storage.temp_target("chunk-h000-00001.tfrecord") is None
  assert storage.temp_target("chunk-h000-00001.tmp") is None


def test_read_json_of_a_truncated_file_names_it(tmp_path):
  path = str(tmp_path / "state.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"phase": "bc", "wall_')
  with pytest.raises(RestJaxError, match=f"{path} is corrupt or truncated"):
    storage.read_json(path)
  with pytest.raises(RestJaxError, match="does not exist"):
    storage.read_json(str(tmp_path / "missing.json"))


def test_json_of_numpy_values(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "stats.json")
  storage.write_json(path, {"mean": np.float32(0.5), "counts": np.arange(3)})
  assert storage.read_json(path) == {"mean": 0.5, "counts": [0, 1, 2]}


def test_listing_and_folders(tmp_path):
  assert storage.listdir(str(tmp_path / "missing")) == []
  storage.write_text(str(tmp_path / "a" / "b.txt"), "x")  # Creates the folder.
  storage.makedirs(str(tmp_path / "a" / "c"))
  assert storage.listdir(str(tmp_path / "a")) == ["b.txt", "c"]
  assert storage.size(str(tmp_path / "a" / "b.txt")) == 1
  assert storage.size(str(tmp_path / "a" / "nothing")) is None
  with pytest.raises(RestJaxError, match="is a file, not a folder"):
    storage.makedirs(str(tmp_path / "a" / "b.txt"))
  storage.rmtree(str(tmp_path / "a"))
  assert not storage.exists(str(tmp_path / "a"))


def test_atomic_dir(tmp_path):
  path = str(tmp_path / "export")
  with pytest.raises(RuntimeError):
    with storage.atomic_dir(path) as tmp:
      storage.write_text(os.path.join(tmp, "config.json"), "{}")
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == []
  with storage.atomic_dir(path) as tmp:
    storage.write_text(os.path.join(tmp, "config.json"), "{}")
    assert not os.path.exists(path)
  assert os.listdir(path) == ["config.json"]
  with pytest.raises(RestJaxError, match="already exists"):
    with storage.atomic_dir(path):
      pass


def test_join_and_absolute_of_urls():
  assert storage.join("gs://bucket/run/", "grow", "g001") == "gs://bucket/run/grow/g001"
  assert storage.join("gs://bucket", "/phases/", "bc.json") == "gs://bucket/phases/bc.json"
  assert storage.join("/work", "grow") == os.path.join("/work", "grow")
  assert not storage.is_local("gs://bucket/x") and storage.is_local("/tmp/x")
  assert storage.is_local("relative/path")
  assert storage.absolute("gs://bucket/run/") == "gs://bucket/run"
  assert storage.absolute("rel") == os.path.abspath("rel")


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (RuntimeError("TensorStore: write failed: No space left on device [OS error]"),
     "no space left on device"),
])
def test_full_disk_is_one_error_and_leaves_no_temporary(tmp_path, error, reason):
  path = str(tmp_path / "chunk.tfrecord")
  storage.write_bytes(path, b"committed")
  with pytest.raises(RestJaxError, match=f"could not write {re.escape(path)}: {reason}. Free "
                     "space"):
    with storage.atomic_path(path) as tmp:
      open(tmp, "wb").write(b"half")
      raise error
  assert os.listdir(tmp_path) == ["chunk.tfrecord"]
  assert open(path, "rb").read() == b"committed"


def test_other_write_errors_pass_unchanged(tmp_path):
  with pytest.raises(PermissionError):
    with storage.atomic_path(str(tmp_path / "f")):
      raise PermissionError(errno.EACCES, "Permission denied")
