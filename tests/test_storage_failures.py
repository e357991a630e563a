"""Storage failures in the middle of a run (bucket deleted, access denied, storage unreachable)
on the GCS emulator: one RestJaxError naming the path, the cause and the fix; what was committed
before is untouched; programming errors still raise as themselves."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf

from rest_jax import storage, storage_errors
from rest_jax.checkpoints import phases
from rest_jax.cli import main as cli
from rest_jax.errors import RestJaxError

_RERUN = "rerun the same command: it resumes from what was committed"


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=jax.sharding.SingleDeviceSharding(
                                                         jax.devices()[0])), tree)


def test_deleted_bucket_is_one_error_and_committed_files_survive(gcs_root, gcs_emulator):
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  tree = {"w": np.arange(6, dtype=np.float32)}
  storage.write_json(storage.join(gcs_root, "run", "state.json"), {"step": 3})
  phases.save_pytree(storage.join(gcs_root, "run", "ckpt"), tree)
  gone = gcs_emulator.create_bucket(gcs_root[len("gs://"):] + "-gone")
  gcs.Client().bucket(gone[len("gs://"):]).delete()  # Deleted while the run writes there.
  with pytest.raises(RestJaxError) as info:
    storage.write_json(storage.join(gone, "run", "state.json"), {"step": 4})
  message = str(info.value)
  assert f"{gone}/run/state.json" in message and "bucket or its folder is gone" in message
  assert _RERUN in message and "\n" not in message
  with pytest.raises(RestJaxError, match=f"bucket {gone} does not exist"):
    phases.save_pytree(storage.join(gone, "ckpt"), tree)  # At once, not after orbax's wait.
  assert storage.read_json(storage.join(gcs_root, "run", "state.json")) == {"step": 3}
  restored = phases.restore_pytree(storage.join(gcs_root, "run", "ckpt"), _abstract(tree))
  np.testing.assert_array_equal(np.asarray(restored["w"]), tree["w"])


def test_denied_and_unreachable_storage_are_one_error(gcs_root, monkeypatch):
  path = storage.join(gcs_root, "run", "state.json")
  storage.write_json(path, {"step": 3})
  tree = {"w": np.arange(4, dtype=np.float32)}
  phases.save_pytree(storage.join(gcs_root, "ckpt"), tree)
  from etils import epath  # pylint: disable=g-import-not-at-top
  denied = tf.errors.PermissionDeniedError(None, None, f"HTTP response code 403 for {path}")
  monkeypatch.setattr(type(epath.Path(path)), "copy", lambda *a, **k: (_ for _ in ()).throw(denied))
  with pytest.raises(RestJaxError, match=f"storage failure on {path}: access denied .*"
                     f"{_RERUN}"):
    storage.write_json(path, {"step": 4})
  monkeypatch.undo()
  assert storage.read_json(path) == {"step": 3}  # The committed object is untouched.
  # TensorStore's error (orbax's arrays) once its retries give up on an unreachable endpoint:
  # not reported as a damaged checkpoint (whose fix would be to delete it).
  unreachable = ValueError("UNAVAILABLE: Error reading gs://b/ckpt/w: CURL error Couldn't "
                           "connect to server")
  monkeypatch.setattr(phases.ocp.StandardCheckpointer, "restore",
                      lambda *a, **k: (_ for _ in ()).throw(unreachable))
  with pytest.raises(RestJaxError, match=r"storage failure on gs://.*/ckpt: the storage cannot "
                     f"be reached .*{_RERUN}"):
    phases.restore_pytree(storage.join(gcs_root, "ckpt"), _abstract(tree))
  monkeypatch.undo()
  restored = phases.restore_pytree(storage.join(gcs_root, "ckpt"), _abstract(tree))
  np.testing.assert_array_equal(np.asarray(restored["w"]), tree["w"])


def test_programming_errors_are_not_hidden(monkeypatch, capsys):
  for error in (TypeError("bad argument"), ValueError("shapes (2,) and (3,)"),
                KeyError("gs://b/x"), tf.errors.InvalidArgumentError(None, None, "bad")):
    assert storage_errors.classify(error) is None
    with pytest.raises(type(error)):
      with storage.user_errors("gs://b/x", writing=True):
        raise error
  unreachable = tf.errors.AbortedError(None, None, "All 1 retry attempts failed. libcurl code 7 "
                                       "meaning 'Could not connect to server' when reading "
                                       "gs://b/run/grow/g001/chunk-h000-00000.tfrecord")
  monkeypatch.setattr(cli, "_inspect", lambda args: (_ for _ in ()).throw(unreachable))
  assert cli.main(["inspect", "gs://b/run"]) == 2  # Escaped the storage layer (a tf.data read).
  err = capsys.readouterr().err.strip()
  assert err.startswith("rest-jax: error: storage failure on "
                        "gs://b/run/grow/g001/chunk-h000-00000.tfrecord: the storage cannot be "
                        "reached") and _RERUN in err and len(err.splitlines()) == 1
  monkeypatch.setattr(cli, "_inspect", lambda args: (_ for _ in ()).throw(TypeError("bug")))
  with pytest.raises(TypeError, match="bug"):
    cli.main(["inspect", "gs://b/run"])
