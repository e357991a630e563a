"""`rest-jax import` / `export` and `rest-jax run` starting from an imported checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

from rest_jax.cli import main as cli
from rest_jax.checkpoints.phases import PhaseCheckpoints
from rest_jax.checkpoints.convert import load_checkpoint, save_orbax
from rest_jax.checkpoints.convert.params import host_arrays
from rest_jax.errors import RestJaxError
from rest_jax.models import build_model, get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
USER_SMOKE = os.path.join(REPO, "gin", "experiments", "user_files_smoke_cpu.gin")


def _arrays(params):
  return dict(host_arrays(params))


def test_import_export_and_run_from_checkpoint(tmp_path, capsys):
  config = get_preset("tiny")
  params = nnx.split(build_model(config, rngs=nnx.Rngs(123)))[1]  # Not the run's seed-0 init.
  save_orbax(str(tmp_path / "ours"), config, params)

  # orbax -> T5X -> orbax (T5X needs the architecture: --preset).
  assert cli.main(["export", "--from", str(tmp_path / "ours"), "--to", "t5x",
                   str(tmp_path / "t5x")]) == 0
  assert cli.main(["import", "--from", "t5x", str(tmp_path / "t5x"), "--preset", "tiny",
                   "--to", str(tmp_path / "imported")]) == 0
  assert "model.gin" in capsys.readouterr().out
  _, imported = load_checkpoint(str(tmp_path / "imported"))
  a, b = _arrays(params), _arrays(imported)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  # Errors are one line, exit 2, and write nothing.
  assert cli.main(["import", "--from", "t5x", str(tmp_path / "t5x"),
                   "--to", str(tmp_path / "x")]) == 2
  assert "does not record its architecture" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x")
  assert cli.main(["export", "--from", str(tmp_path / "ours"), "--to", "hf",
                   str(tmp_path / "t5x")]) == 2
  assert "already exists" in capsys.readouterr().err

  # Start a run from the imported checkpoint, skipping BC: BC's best params are the checkpoint's.
  work = str(tmp_path / "work")
  code = cli.main(["run", "--workdir", work, "--gin_file", SMOKE, "--gin_file",
                   str(tmp_path / "imported" / "model.gin"), "--no_progress",
                   "--gin.config.RunConfig.run_bc=False",
                   "--gin.config.RunConfig.num_grow_steps=0",
                   "--gin.config.EvalConfig.num_examples=8",
                   "--gin.config.EvalConfig.batch_size=8",
                   "--gin.config.EvalConfig.max_decode_len=8"])
  assert code == 0, capsys.readouterr().err
  with open(os.path.join(work, "summary.json"), encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  assert [(r["phase"], r["train_examples"]) for r in rows] == [("bc", 0)]
  abstract = load_checkpoint(str(tmp_path / "imported"))[1]
  with PhaseCheckpoints(os.path.join(work, "checkpoints", "bc")) as ckpt:
    import jax  # pylint: disable=g-import-not-at-top
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          abstract)
    best = ckpt.restore_best_params(target)
  for key, value in _arrays(best).items():
    np.testing.assert_array_equal(value, a[key], err_msg=key)


@pytest.mark.parametrize("fixture, kind", [("llama_gqa", "decoder"), ("t5_v1_1", "encdec")])
def test_import_binds_the_checkpoints_tokenizer_and_task_kind(tmp_path, capsys, monkeypatch,
                                                              fixture, kind):
  """model.gin of a checkpoint with a tokenizer.json makes the own-data experiment runnable."""
  from rest_jax.pipeline import build  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  dst = str(tmp_path / fixture)
  assert cli.main(["import", "--from", "hf", f"tests/testdata/hf/{fixture}", "--to", dst]) == 0
  assert f"tokenizer hf:{dst}/tokenizer.json" in capsys.readouterr().out
  assert os.path.isfile(os.path.join(dst, "tokenizer.json"))
  text = open(os.path.join(dst, "model.gin"), encoding="utf-8").read()
  assert f"config.FileTaskConfig.kind = '{kind}'" in text
  assert f"config.FileTaskConfig.vocabulary = 'hf:{dst}/tokenizer.json'" in text
  config, _ = cli.parse_run_config([USER_SMOKE, os.path.join(dst, "model.gin")], [])
  assert config.model.kind == kind and config.init_checkpoint == f"orbax:{dst}"
  build.validate(config)  # Vocabulary size and task kind match the model.
  # On a registered byte-vocabulary task the error points to the checkpoint's tokenizer.
  config, _ = cli.parse_run_config([SMOKE, os.path.join(dst, "model.gin")], [])
  with pytest.raises(RestJaxError, match="use the checkpoint's tokenizer"):
    build.validate(config)
