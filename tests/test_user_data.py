"""Tasks users bring: local JSONL / TSV files (declared in gin), TFDS-backed tasks (mocked),
and a short ReST loop over a JSONL task with a Hugging Face tokenizer."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rest_jax import config as C
from rest_jax import tasks
from rest_jax.checkpoints import convert
from rest_jax.tasks import data
from rest_jax.pipeline import run as pipeline
from rest_jax.tasks import vocabularies
from rest_jax.errors import RestJaxError
from tokenizer_fixtures import build_hf_tokenizer

WORDS = ["zero", "one", "two", "three", "four", "five"]


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def _sum_rows(pairs, *, labeled=True):
  rows = []
  for a, b in pairs:
    row = {"question": f"what is {WORDS[a]} plus {WORDS[b]}", "final": WORDS[a + b]}
    if labeled:
      row["solution"] = WORDS[a + b]
    rows.append(row)
  return rows


def test_jsonl_and_tsv_tasks(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "eins", "reference": "one"}, {"prompt": "zwei", "answer": 2}])
  (tmp_path / "eval.tsv").write_text("prompt\treference\textra\ndrei\tthree\tx\n\nvier\tfour\ty\n")
  unlabeled = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "fuenf"}])
  test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "sechs", "reference": "six"}])
  cfg = C.FileTaskConfig(name="user_de_en", train=train, validation=str(tmp_path / "eval.tsv"),
                         unlabeled=unlabeled, test=test, prompt_template="de: {prompt}")
  assert tasks.from_config(cfg) == "user_de_en"
  task = tasks.get_task("user_de_en")
  rows = {s: data.examples(task, s, input_len=20, target_len=20)
          for s in ("train", "validation", "unlabeled", "test")}
  assert [(r["inputs_pretokenized"], r["targets_pretokenized"], r["example_id"])
          for r in rows["train"]] == [("de: eins", "one", 0), ("de: zwei", "2", 4)]
  assert [(r["inputs_pretokenized"], r["targets_pretokenized"], r["example_id"])
          for r in rows["validation"]] == [("de: drei", "three", 1), ("de: vier", "four", 5)]
  assert [(r["targets_pretokenized"], r["example_id"]) for r in rows["unlabeled"]] == [("", 2)]
  assert [(r["inputs_pretokenized"], r["targets_pretokenized"], r["example_id"])
          for r in rows["test"]] == [("de: sechs", "six", 3)]
  no_test = dataclasses.replace(cfg, name="user_de_en_no_test", test="")
  assert "test" not in tasks.get_task(tasks.from_config(no_test)).splits
  byte = vocabularies.get_vocabulary("byte")
  np.testing.assert_array_equal(rows["train"][0]["inputs"], byte.encode("de: eins") + [1])
  np.testing.assert_array_equal(rows["train"][0]["targets"], byte.encode("one") + [1])


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", '], r"train.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "reference": "b"}', '', '["a"]'], r"train.jsonl:3: a JSON list"),
    (['{"prompt": "a"}'], r"train.jsonl:1: no 'reference' or 'answer' field.*unlabeled file"),
    (['{"text": "a", "reference": "b"}'], r"train.jsonl:1: no 'prompt' field.*prompt_field"),
])
def test_bad_files_name_file_and_line(tmp_path, lines, match):
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  good = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "reference": "b"}])
  cfg = C.FileTaskConfig(name="bad", train=str(tmp_path / "train.jsonl"), validation=good)
  with pytest.raises(RestJaxError, match=match):
    tasks.from_config(cfg)


def test_missing_file_duplicate_ids_and_tsv_columns(tmp_path):
  good = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "reference": "b", "id": 7}])
  with pytest.raises(RestJaxError, match="no/such.jsonl does not exist; fix the path"):
    tasks.from_config(C.FileTaskConfig(name="m", train=good, validation="/no/such.jsonl"))
  with pytest.raises(RestJaxError, match="example id 7"):
    tasks.from_config(C.FileTaskConfig(name="d", train=good, validation=good, id_field="id"))
  (tmp_path / "b.tsv").write_text("prompt\treference\nx\ty\tz\n")
  with pytest.raises(RestJaxError, match=r"b.tsv:2: 3 tab-separated columns"):
    tasks.from_config(C.FileTaskConfig(name="t", train=good, validation=str(tmp_path / "b.tsv")))
  with pytest.raises(RestJaxError, match="train and validation files are required"):
    C.FileTaskConfig(name="x", train=good)


def test_tfds_gsm8k_and_translation_tasks_on_mock_data():
  with tfds.testing.mock_data(num_examples=3):
    name = tasks.from_config(C.TfdsTaskConfig(name="gsm8k_mock", dataset="gsm8k",
                                              kind="decoder", prompt_template="Q: {prompt}\nA:"))
    task = tasks.get_task(name)
    rows = data.examples(task, "validation", input_len=2000, target_len=2000)
    assert [r["example_id"] for r in rows] == [1, 5, 9]  # index * 4 + code ("test" split).
    assert all(r["inputs_pretokenized"].startswith("Q: ") for r in rows)
    assert all(r["inputs_pretokenized"].endswith("\nA:") for r in rows)
    assert rows[0]["inputs"][-1] != 1  # Decoder-only prompts get no EOS; targets do.
    assert rows[0]["targets"][-1] == 1
    assert task.num_input_examples("train") == 3
    name = tasks.from_config(C.TfdsTaskConfig(name="wmt_mock", dataset="wmt20_zh_en"))
    rows = data.examples(tasks.get_task(name), "train", input_len=2000, target_len=2000)
    assert [r["example_id"] for r in rows] == [0, 4, 8]

  # ted_multi_translate: keep the talks with both de and en, German -> English.
  def as_dataset(self, split, **kwargs):  # pylint: disable=unused-argument
    import tensorflow as tf
    langs = [["de", "en", "fr"], ["fr", "en"], ["en", "de"]]
    texts = [["Hallo", "Hello", "Salut"], ["Salut", "Hi"], ["Yes", "Ja"]]
    return tf.data.Dataset.from_generator(
        lambda: ({"talk_name": "t", "translations": {"language": l, "translation": t}}
                 for l, t in zip(langs, texts)),
        output_signature={"talk_name": tf.TensorSpec([], tf.string), "translations": {
            "language": tf.TensorSpec([None], tf.string),
            "translation": tf.TensorSpec([None], tf.string)}})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    name = tasks.from_config(C.TfdsTaskConfig(name="iwslt_mock", dataset="iwslt14_de_en"))
    task = tasks.get_task(name)
    rows = data.examples(task, "train", input_len=20, target_len=20)
    assert [(r["inputs_pretokenized"], r["targets_pretokenized"], r["example_id"])
            for r in rows] == [("Hallo", "Hello", 0), ("Ja", "Yes", 8)]
    assert task.num_input_examples("train") == 2
    rows = data.examples(task, "test", input_len=20, target_len=20)  # TED's own test split.
    assert [r["example_id"] for r in rows] == [2, 10]
  assert "test" not in tasks.get_task("gsm8k_mock").splits  # Its "validation" is GSM8K's test.


def test_tfds_not_prepared_is_a_user_error(tmp_path):
  name = tasks.from_config(C.TfdsTaskConfig(name="gsm8k_none", dataset="gsm8k",
                                            data_dir=str(tmp_path)))
  with pytest.raises(RestJaxError, match="tfds build gsm8k"):
    data.examples(tasks.get_task(name), "train", input_len=8, target_len=8)
  with pytest.raises(RestJaxError, match="'iwslt14_de_en'"):
    tasks.from_config(C.TfdsTaskConfig(name="x", dataset="iwslt"))


def test_rest_loop_on_jsonl_task_with_hf_tokenizer(tmp_path):
  """1 Grow x 1 Improve, decoder-only, tokenizer.json vocabulary, answer-checking reward."""
  tokenizer = build_hf_tokenizer(str(tmp_path))
  pairs = [(a, b) for a in range(6) for b in range(6) if a + b < 6]  # 21 problems.
  train = _write_jsonl(tmp_path / "train.jsonl", _sum_rows(pairs[:10]))
  evals = _write_jsonl(tmp_path / "eval.jsonl", _sum_rows(pairs[10:15]))
  unlabeled = _write_jsonl(tmp_path / "u.jsonl", _sum_rows(pairs[15:], labeled=False))
  vocab_spec = f"hf:{tokenizer}?pad=<unk>"
  name = tasks.from_config(C.FileTaskConfig(
      name="user_sums", train=train, validation=evals, unlabeled=unlabeled, kind="decoder",
      vocabulary=vocab_spec, prompt_field="question", reference_field="solution",
      answer_field="final"))
  vocab = vocabularies.get_vocabulary(vocab_spec)
  # Start from an imported Hugging Face Llama checkpoint (grouped-query attention, 64 tokens).
  llama = os.path.join(os.path.dirname(__file__), "testdata", "hf", "llama_gqa")
  model, _ = convert.load_checkpoint(f"hf:{llama}")
  cfg = C.RunConfig(
      task=name, model=model, init_checkpoint=f"hf:{llama}", run_bc=False,
      reward="exact_match", input_len=16, target_len=8, num_grow_steps=1, num_improve_steps=1,
      bc=C.TrainConfig(learning_rate=3e-3, num_steps=2, batch_size=8, eval_every=2),
      improve=C.ImproveConfig(thresholds=(0.0,), train=C.TrainConfig(
          learning_rate=1e-3, num_steps=2, batch_size=8, eval_every=2)),
      grow=C.GrowConfig(sampling=C.SamplingConfig(num_samples=2, batch_size=16,
                                                  max_decode_len=8),
                        chunk_size=16, unlabeled_split="unlabeled"),
      eval=C.EvalConfig(num_examples=5, batch_size=8, max_decode_len=8))
  out = pipeline.run(cfg, str(tmp_path / "work"), progress=False)
  assert [(r["phase"], r["grow_step"], r["improve_step"]) for r in out["rows"]] == [
      ("bc", 0, 0), ("improve", 1, 1)]
  assert out["rows"][0]["train_examples"] == 0  # run_bc=False: the import is the start.
  from rest_jax.grow import dataset as growdata
  records = list(growdata.read_records(str(tmp_path / "work" / "grow" / "g001")))
  # 10 labeled + 6 unlabeled prompts x 2 samples, plus D's 10 originals.
  assert len([r for r in records if r.sample_idx >= 0]) == (10 + 6) * 2
  assert len([r for r in records if r.sample_idx == -1]) == 10
  assert all(0 <= int(t) < cfg.model.vocab_size for r in records for t in r.targets)
