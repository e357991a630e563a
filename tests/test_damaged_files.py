"""Every damaged file the CLI reads back is named in one error line (exit 2), never a traceback,
and the workdir is left as it was. Each case builds only the files it needs (no training)."""

import glob
import hashlib
import json
import os

import pytest

from rest_jax.cli import main as cli
from rest_jax.grow import dataset as growdata
from rest_jax.grow.dataset import GrowWriter
from tests.test_growdata import _chunk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
TRUNCATED, BINARY, WRONG_TYPE = b'{"phase": "bc", "wall', b"\xff\xfe\x00garbage", b"[1, 2]"
MESSAGES = []  # (kind, message) of every case, printed at the end (-s) for the report.


def _snapshot(root):
  return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
          for p in sorted(glob.glob(os.path.join(root, "**"), recursive=True))
          if os.path.isfile(p)}


def _fails(argv, capsys, names, kind, root=None):
  before = _snapshot(root) if root else None
  code = cli.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("rest-jax: error:") and err.count("\n") == 1, err
  assert "Traceback" not in err and names in err, err
  if root:
    assert _snapshot(root) == before
  MESSAGES.append((kind, err.strip()[len("rest-jax: error: "):]))
  return err


@pytest.fixture
def workdir(tmp_path):
  """A workdir with the smoke run's config recorded (what a run writes first)."""
  from rest_jax.pipeline.workdir import Workdir  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "w")
  config, text = cli.parse_run_config([SMOKE], [])
  Workdir(work).record_config(config, text)
  return work


def _run(work):
  return ["run", "--workdir", work, "--gin_file", SMOKE, "--no_progress"]


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  _fails(_run(str(path)), capsys, f"{path} exists and is a file", "run --workdir FILE")


@pytest.mark.parametrize("name,content", [
    ("run_config.json", TRUNCATED), ("run_config.json", BINARY),
    ("run_config.json", WRONG_TYPE), ("run_config.json", b""),
    ("state.json", TRUNCATED), ("state.json", BINARY), ("state.json", b"{}"),
    ("state.json", b'{"phase": "bc", "wall_time_s": "soon"}'),
    ("phases/bc.json", TRUNCATED), ("phases/bc.json", WRONG_TYPE),
    ("phases/g001_i01.json", b'{"phase": "g001_i01"}'),
])
def test_rerun_names_a_damaged_state_file(workdir, capsys, name, content):
  path = os.path.join(workdir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)
  err = _fails(_run(workdir), capsys, path, f"run: {name} = {content[:24]!r}", workdir)
  assert "restore it" in err or "delete it" in err


def _grow_dir(work):
  directory = os.path.join(work, "grow", "g001")
  writer = GrowWriter(directory)
  writer.write_chunk(0, _chunk(0))
  writer.write_chunk(1, _chunk(1))
  growdata.finalize(directory)
  return directory


@pytest.mark.parametrize("name,content", [
    ("stats.json", TRUNCATED), ("stats.json", b'{"count": 3}'), ("stats.json", BINARY),
])
def test_inspect_names_a_damaged_grow_file(tmp_path, capsys, name, content):
  directory = _grow_dir(str(tmp_path / "w"))
  path = os.path.join(directory, name)
  with open(path, "wb") as f:
    f.write(content)
  err = _fails(["inspect", str(tmp_path / "w")], capsys, path, f"inspect: grow/g001/{name}",
               str(tmp_path / "w"))
  assert "delete COMPLETED, stats.json and index.npz" in err


def test_inspect_does_not_read_index_npz(tmp_path, capsys):
  # inspect streams the per-chunk index files: a damaged index.npz changes nothing.
  directory = _grow_dir(str(tmp_path / "w"))
  assert cli.main(["inspect", str(tmp_path / "w")]) == 0
  report = capsys.readouterr().out
  with open(os.path.join(directory, "index.npz"), "wb") as f:
    f.write(b"PK\x03\x04truncated")
  assert cli.main(["inspect", str(tmp_path / "w")]) == 0
  assert capsys.readouterr().out == report


@pytest.mark.parametrize("content", [TRUNCATED, b"{}", BINARY])
def test_compare_names_a_damaged_summary(tmp_path, capsys, content):
  work = tmp_path / "w"
  work.mkdir()
  (work / "summary.json").write_bytes(content)
  _fails(["compare", str(work)], capsys, str(work / "summary.json"),
         f"compare: summary.json = {content[:24]!r}", str(work))


def test_compare_names_a_damaged_sweep_manifest(tmp_path, capsys):
  (tmp_path / "sweep.json").write_bytes(b'{"runs": [')
  _fails(["compare", str(tmp_path)], capsys, str(tmp_path / "sweep.json"), "compare: sweep.json")


@pytest.mark.parametrize("content", [TRUNCATED, b'{"model": {}}', b'{"model": {"nope": 1}, '
                                     b'"vocabulary": {}, "input_len": 8, "target_len": 8}'])
def test_reward_model_json(tmp_path, capsys, content):
  directory = tmp_path / "rm"
  directory.mkdir()
  (directory / "reward_model.json").write_bytes(content)
  _fails(["serve-reward", "--reward", f"learned:{directory}", "--port", "0"], capsys,
         str(directory / "reward_model.json"), f"learned reward: reward_model.json = "
         f"{content[:24]!r}", str(directory))


@pytest.mark.parametrize("content", [TRUNCATED, WRONG_TYPE, b'{"num_layers": "many"}'])
def test_imported_model_config(tmp_path, capsys, content):
  directory = tmp_path / "imported"
  directory.mkdir()
  (directory / "model_config.json").write_bytes(content)
  _fails(["export", "--from", f"orbax:{directory}", "--to", "hf", str(tmp_path / "out")], capsys,
         "model_config.json", f"export: model_config.json = {content[:24]!r}", str(directory))
  assert not os.path.exists(tmp_path / "out")


def test_hf_config_json(tmp_path, capsys):
  directory = tmp_path / "hf"
  directory.mkdir()
  (directory / "config.json").write_bytes(TRUNCATED)
  _fails(["import", "--from", "hf", str(directory), "--to", str(tmp_path / "out")], capsys,
         str(directory / "config.json"), "import: HF config.json", str(directory))


def test_zz_print_messages():
  """Prints every case's message (run with -s to list the bad-input kinds and their lines)."""
  for kind, message in MESSAGES:
    print(f"{kind}\n    {message}")
