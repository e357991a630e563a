"""A full disk (an injected ENOSPC) during a Grow chunk, a checkpoint and a phase marker: each
is one clear error naming the file (exit 2, no traceback), nothing committed changes, and the
rerun after space is freed resumes to exactly the uninterrupted run.

Slow (61 s on 2 idle cores: five runs); the fast unit tests of the same errors are in
test_storage.py and test_checkpoints.py."""

import errno
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import committed_files
from rest_jax import storage
from rest_jax.cli import main as cli
from rest_jax.grow import dataset as growdata
from rest_jax.pipeline import build
from rest_jax.pipeline.workdir import Workdir, phase_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
TINY = ["--gin.config.RunConfig.num_grow_steps=1", "--gin.config.RunConfig.num_improve_steps=1",
        "--gin.bc/config.TrainConfig.num_steps=2", "--gin.bc/config.TrainConfig.eval_every=2",
        "--gin.improve/config.TrainConfig.num_steps=4",
        "--gin.improve/config.TrainConfig.eval_every=2",
        "--gin.config.EvalConfig.num_examples=8", "--gin.config.SamplingConfig.num_samples=1",
        "--gin.config.GrowConfig.chunk_size=64"]


def _full() -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _snapshot(workdir: str) -> dict[str, str]:
  """sha256 of every committed file (temporaries, ours and orbax's, left out)."""
  return {p: hashlib.sha256(open(os.path.join(workdir, p), "rb").read()).hexdigest()
          for p in committed_files(workdir)}


def _run(workdir: str, capsys) -> tuple[int, str]:
  code = cli.main(["run", "--workdir", workdir, "--gin_file", SMOKE, "--no_progress",
                    *TINY])
  return code, capsys.readouterr().err


def _records(workdir: str) -> dict:
  return {(r.example_id, r.sample_idx): (tuple(r.targets), r.reward)
          for r in growdata.read_records(os.path.join(workdir, "grow", "g001"))}


def _final_params(workdir: str) -> list[np.ndarray]:
  config, _ = cli.parse_run_config([SMOKE], [a[len("--gin."):] for a in TINY])
  params = build.build(config, Workdir(workdir), progress=False).restore_best(phase_name(1, 1))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _check_failure(code: int, err: str, work: str, path: str, committed: dict) -> None:
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith("rest-jax: error:")]
  assert len(lines) == 1 and lines[0].startswith("rest-jax: error: could not write "), err
  assert path in lines[0] and "no space left on device" in lines[0], err
  assert "Free space" in lines[0] and "rerun" in lines[0], err
  after = _snapshot(work)
  assert {p: after.get(p) for p in committed} == committed  # Committed files are untouched.
  assert not [p for p in after if p.endswith(".tmp") and "orbax" not in p]


@pytest.mark.slow
def test_full_disk_is_one_error_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
  ref = str(tmp_path / "ref")
  assert _run(ref, capsys)[0] == 0

  work = str(tmp_path / "work")
  real_fsync = storage._fsync  # pylint: disable=protected-access
  committed: dict[str, str] = {}

  def fsync_full_at(fragment):
    def fsync(path):
      if fragment in path and path.endswith(".tmp"):
        committed.update(_snapshot(work))
        raise _full()
      return real_fsync(path)
    return fsync

  # 1. Grow: the disk fills while chunk 1 is written.
  monkeypatch.setattr(storage, "_fsync", fsync_full_at(".chunk-h000-00001.tfrecord."))
  code, err = _run(work, capsys)
  _check_failure(code, err, work, os.path.join(work, "grow", "g001", "chunk-h000-00001.tfrecord"),
                 committed)
  assert os.path.exists(os.path.join(work, "grow", "g001", "chunk-h000-00000.tfrecord"))
  monkeypatch.setattr(storage, "_fsync", real_fsync)

  # 2. A checkpoint: orbax cannot save Improve's TrainState at step 2.
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if str(self.directory).endswith(os.path.join("g001_i01", "latest")) and step == 2:
      committed.clear()
      committed.update(_snapshot(work))
      raise _full()
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  code, err = _run(work, capsys)
  _check_failure(code, err, work, os.path.join(work, "checkpoints", "g001_i01", "latest", "2"),
                 committed)
  assert growdata.is_complete(os.path.join(work, "grow", "g001"))
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)

  # 3. The phase marker, written last.
  committed.clear()
  monkeypatch.setattr(storage, "_fsync", fsync_full_at(".g001_i01.json."))
  code, err = _run(work, capsys)
  _check_failure(code, err, work, os.path.join(work, "phases", "g001_i01.json"), committed)
  monkeypatch.setattr(storage, "_fsync", real_fsync)

  # Space freed: the same command resumes and ends where the uninterrupted run ends.
  code, err = _run(work, capsys)
  assert code == 0, err
  assert Workdir(work).marked(phase_name(1, 1)) == Workdir(ref).marked(phase_name(1, 1))
  assert _records(work) == _records(ref)
  for a, b in zip(_final_params(work), _final_params(ref), strict=True):
    np.testing.assert_array_equal(a, b)
