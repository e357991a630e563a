"""The smoke experiment with its workdir on ``gs://`` (the GCS emulator of tests/gcs_emulator.py),
end to end through the CLI, SIGKILLed mid-Grow and mid-Improve and rerun: it ends with the
summary rows and Grow records of the same run, uninterrupted, on local disk.

A bucket that does not exist is one error line before any work (fast).
"""

import os
import signal
import subprocess
import time

import pytest

from conftest import SMOKE, SMOKE_SHRINK, start_smoke_run
from rest_jax import storage
from rest_jax.grow import dataset as growdata
from rest_jax.pipeline.workdir import Workdir

SHRINK = SMOKE_SHRINK


def _start(workdir: str, log: str) -> subprocess.Popen:
  return start_smoke_run(workdir, log, SHRINK)


def _tail(log: str) -> str:
  with open(log, errors="replace") as f:
    return f.read()[-3000:]


def _kill_when(proc: subprocess.Popen, ready, log: str) -> None:
  """SIGKILLs ``proc`` as soon as ``ready()`` holds (polled on the bucket)."""
  while not ready():
    assert proc.poll() is None, _tail(log)
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _records(workdir: str) -> dict:
  out = {}
  for g in (1, 2):
    for r in growdata.read_records(Workdir(workdir).grow_dir(g)):
      out[(g, r.example_id, r.sample_idx)] = (tuple(r.targets), r.reward)
  return out


@pytest.mark.slow
def test_smoke_on_gcs_resumes_after_sigkill_equal_to_local(gcs_root, tmp_path):
  local, log = str(tmp_path / "local"), str(tmp_path / "run.log")
  started = time.time()
  assert _start(local, log).wait(timeout=1200) == 0, _tail(log)
  local_s = time.time() - started

  work = Workdir(gcs_root + "/smoke")
  started = time.time()
  proc = _start(work.root, log)  # Killed once Grow g1 has committed a chunk, before finalize.
  _kill_when(proc, lambda: growdata.chunk_files(work.grow_dir(1)), log)
  assert not growdata.is_complete(work.grow_dir(1))
  proc = _start(work.root, log)  # Killed in Improve g1 i1, after its first checkpoint.
  _kill_when(proc, lambda: storage.listdir(
      storage.join(work.checkpoint_dir("g001_i01"), "latest")), log)
  assert work.marked("g001_i01") is None
  proc = _start(work.root, log)
  assert proc.wait(timeout=1200) == 0, _tail(log)
  print(f"\nlocal disk, uninterrupted: {local_s:.0f} s; on the emulator, killed twice and "
        f"rerun: {time.time() - started:.0f} s in all")

  ref, got = storage.read_json(storage.join(local, "summary.json")), work.read_summary()
  assert got["rows"] == ref["rows"] and len(ref["rows"]) == 5
  assert _records(work.root) == _records(local)
  for name in ("tb", "report", "config.gin"):  # TensorBoard, plots, config: all on the bucket.
    assert storage.exists(work.path(name)), name


def test_missing_bucket_is_one_error_before_any_work(gcs_emulator, capsys):
  del gcs_emulator  # Its environment points the clients at the emulator.
  from rest_jax.cli import main as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["run", "--workdir", "gs://no-such-bucket-here/run", "--gin_file", SMOKE,
                   "--no_progress"]) == 2
  err = capsys.readouterr().err
  assert "rest-jax: error: bucket gs://no-such-bucket-here does not exist" in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not os.path.exists("gs:")  # Nothing written to a local folder "gs:".
