"""Every start-up check runs before the workdir is created: a failed start leaves no trace, and
the corrected command then just runs (no "made by a different config" refusal)."""

import json
import os

import pytest

from rest_jax.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
TINY = ["--no_progress", "--gin.bc/config.TrainConfig.num_steps=2",
        "--gin.bc/config.TrainConfig.eval_every=2", "--gin.config.RunConfig.num_grow_steps=1",
        "--gin.config.RunConfig.num_improve_steps=1",
        "--gin.improve/config.TrainConfig.num_steps=2",
        "--gin.improve/config.TrainConfig.eval_every=2", "--gin.config.EvalConfig.num_examples=4",
        "--gin.config.EvalConfig.max_decode_len=8", "--gin.config.SamplingConfig.num_samples=1",
        "--gin.config.SamplingConfig.max_decode_len=8"]

BAD_STARTS = [
    ("--gin.config.RunConfig.task='no_such_task'", "task 'no_such_task' is not registered"),
    ("--gin.models.get_preset.vocab_size=64", "raise the model's vocab_size"),
    ("--gin.models.get_preset.name='tiny_decoder'", "is of kind 'encdec' but the model is a "
     "decoder-only model"),
    ("--gin.bc/config.TrainConfig.batch_size=3", "batch_size"),
    ("--gin.config.RunConfig.init_checkpoint='hf:tests/testdata/hf/t5_v1_1'", "checkpoint"),
]


def test_failed_starts_leave_no_workdir_then_the_corrected_command_runs(tmp_path, capsys,
                                                                      monkeypatch):
  monkeypatch.chdir(REPO)
  work = str(tmp_path / "w")
  base = ["run", "--workdir", work, "--gin_file", SMOKE] + TINY
  for binding, fragment in BAD_STARTS:
    assert cli.main(base + [binding]) == 2, binding
    err = capsys.readouterr().err
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err  # One line, no traceback.
    assert not os.path.exists(work), f"{binding} left {os.listdir(work)}"
  assert cli.main(base) == 0, capsys.readouterr().err
  with open(os.path.join(work, "summary.json"), encoding="utf-8") as f:
    assert [r["phase"] for r in json.load(f)["rows"]] == ["bc", "improve"]


@pytest.mark.parametrize("checkpoint", ["", "hf:tests/testdata/hf/llama_gqa"])
def test_vocabulary_error_names_the_fix(checkpoint, monkeypatch):
  from rest_jax.errors import RestJaxError
  from rest_jax.pipeline import build
  monkeypatch.chdir(REPO)
  bindings = ["models.get_preset.name = 'tiny_decoder'", "models.get_preset.vocab_size = 64",
              "config.RunConfig.task = 'arith_small'"]
  if checkpoint:
    bindings.append(f"config.RunConfig.init_checkpoint = '{checkpoint}'")
  config, _ = cli.parse_run_config([SMOKE], bindings)
  fix = "use the checkpoint's tokenizer" if checkpoint else "raise the model's vocab_size"
  with pytest.raises(RestJaxError, match=fix):
    build.validate(config)
