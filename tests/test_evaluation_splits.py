"""The test split: evaluated once per finished phase, reported in the rows, never selected on."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from rest_jax import config as C
from rest_jax import tasks
from rest_jax.pipeline import build
from rest_jax.pipeline import run as pipeline
from rest_jax.pipeline.reporting import format_table, summary_row
from rest_jax.pipeline.workdir import Workdir, phase_name
from rest_jax.models import get_preset
from rest_jax.tasks import numbers

# Small enough that both runs are mostly compilation: 32 Grow prompts, 16 validation, 16 test.
tasks.register(numbers.make_numbers_task("numbers_split_test", num_train=32, num_eval=16,
                                         max_number=999, seed=0, num_test=16))


def _config(num_test_examples) -> C.RunConfig:
  return C.RunConfig(
      task="numbers_split_test", model=get_preset("tiny", num_encoder_layers=1,
                                                  num_decoder_layers=1),
      reward="chrf", input_len=40, target_len=40, num_grow_steps=1, num_improve_steps=1,
      bc=C.TrainConfig(learning_rate=3e-3, num_steps=6, batch_size=16, eval_every=3),
      improve=C.ImproveConfig(thresholds=(0.3,), train=C.TrainConfig(
          learning_rate=1e-3, num_steps=4, batch_size=16, eval_every=2)),
      grow=C.GrowConfig(sampling=C.SamplingConfig(num_samples=2, batch_size=32,
                                                  max_decode_len=24), chunk_size=32),
      eval=C.EvalConfig(num_examples=16, batch_size=16, max_decode_len=24,
                        num_test_examples=num_test_examples, num_test_samples=4))


def _params(workdir, cfg, phase):
  params = build.build(cfg, Workdir(workdir), progress=False).restore_best(phase)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow  # Two whole runs (63 s of a 2-worker suite run); the README's claim.
def test_test_split_does_not_change_training_or_selection(tmp_path):
  with_test, without = _config(None), _config(0)
  a = pipeline.run(with_test, str(tmp_path / "test"), progress=False)["rows"]
  b = pipeline.run(without, str(tmp_path / "none"), progress=False)["rows"]
  assert all({"test_reward", "test_exact_match", "test_independent", "test_pass@1", "test_pass@4",
              "test_distinct_2"} <= set(r) for r in a)
  assert all(r["test_pass@1"] <= r["test_pass@4"] for r in a)
  assert not any(k.startswith("test_") for r in b for k in r)
  # Same validation metrics, thresholds and training sets: the test evaluation fed nothing back.
  assert [{k: v for k, v in r.items() if not k.startswith("test_")} for r in a] == b
  for phase in ("bc", phase_name(1, 1)):
    for x, y in zip(_params(str(tmp_path / "test"), with_test, phase),
                    _params(str(tmp_path / "none"), without, phase)):
      np.testing.assert_array_equal(x, y)
  assert "test" in format_table(a).splitlines()[0].split()
  assert "test" not in format_table(b).splitlines()[0].split()


def test_test_size_and_missing_test_split(tmp_path, caplog):
  small = tasks.get_task("numbers_de_en_small")
  assert build.num_test_prompts(_config(None), small) == 16  # EvalConfig.num_examples.
  assert build.num_test_prompts(_config(5), small) == 5
  with caplog.at_level(logging.INFO, logger="rest_jax"):
    assert build.num_test_prompts(_config(0), small) == 0
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "reference": "b"}\n')
    path = str(tmp_path / "d.jsonl")
    name = tasks.from_config(C.FileTaskConfig(name="no_test_split", train=path, validation=path))
    assert build.num_test_prompts(_config(None), tasks.get_task(name)) == 0
  assert "num_test_examples = 0" in caplog.text
  assert "'no_test_split' has no 'test' split" in caplog.text and "FileTaskConfig.test" in caplog.text
  with pytest.raises(Exception, match="num_test_examples must be >= 0"):
    C.EvalConfig(num_test_examples=-1)
  # The test set is the first num_test_examples prompts of the test split.
  assert build.eval_set(_config(5), small, 5, split="test").sources == [
      e["inputs_pretokenized"] for e in build.data.examples(small, "test", input_len=40,
                                                           target_len=40)[:5]]


def test_summary_row_and_table_with_test_metrics():
  row = summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None, train_examples=3,
                    eval_reward=0.5, eval_exact_match=0.25,
                    test={"test_reward": 0.4, "test_exact_match": 0.125})
  assert row["test_reward"] == 0.4 and row["eval_reward"] == 0.5 and "test_independent" not in row
  old = summary_row(phase="improve", grow_step=1, improve_step=1, threshold=0.7,
                    train_examples=2, eval_reward=0.6, eval_exact_match=0.5)
  lines = format_table([row, old]).splitlines()
  assert lines[0].split() == ["phase", "g", "i", "tau", "examples", "reward", "exact", "test",
                              "t.exact"]
  assert lines[2].split() == ["bc", "0", "0", "-", "3", "0.5000", "0.250", "0.4000", "0.125"]
  assert lines[3].split() == ["improve", "1", "1", "0.700", "2", "0.6000", "0.500", "-", "-"]
  with pytest.raises(ValueError, match="unknown test metrics"):
    summary_row(phase="bc", grow_step=0, improve_step=0, threshold=None, train_examples=3,
                eval_reward=0.5, eval_exact_match=0.25, test={"test_bleu": 0.1})
