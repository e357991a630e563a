"""Embedded seqio tasks: deterministic, disjoint splits, exact tokens, stable unique ids."""

from __future__ import annotations

import numpy as np
import pytest
from num2words import num2words

from rest_jax import tasks

from rest_jax.tasks import data
from rest_jax.errors import RestJaxError
from rest_jax.tasks import arith, numbers


def _bytes_ids(text: str) -> list[int]:
  return [b + 3 for b in text.encode("utf-8")]  # ByteVocabulary: byte b -> id b + 3.


@pytest.fixture(scope="module")
def numbers_small():
  task = tasks.get_task("numbers_de_en_small")
  return {split: data.examples(task, split, input_len=64, target_len=64)
          for split in ("train", "validation")}


def test_numbers_small_splits_texts_and_tokens(numbers_small):
  train, evaluation = numbers_small["train"], numbers_small["validation"]
  assert (len(train), len(evaluation)) == (256, 64)
  train_ids = [e["example_id"] for e in train]
  eval_ids = [e["example_id"] for e in evaluation]
  assert len(set(train_ids)) == 256 and len(set(eval_ids)) == 64
  assert not set(train_ids) & set(eval_ids)
  assert all(0 <= i <= 999 for i in train_ids + eval_ids)
  for e in train[:20] + evaluation[:20]:
    n = e["example_id"]
    assert e["inputs_pretokenized"] == num2words(n, lang="de")
    assert e["targets_pretokenized"] == num2words(n, lang="en")
    assert e["inputs"].dtype == np.int32
    assert e["inputs"].tolist() == _bytes_ids(e["inputs_pretokenized"]) + [1]
    assert e["targets"].tolist() == _bytes_ids(e["targets_pretokenized"]) + [1]
    # Round trip through the vocabulary (EOS dropped by decode).
    assert tasks.BYTE_VOCAB.decode(e["targets"].tolist()) == e["targets_pretokenized"]
    assert tasks.BYTE_VOCAB.decode(e["inputs"].tolist()) == e["inputs_pretokenized"]


def test_numbers_umlaut_round_trip():
  text = num2words(5, lang="de")
  assert text == "fünf"
  ids = tasks.BYTE_VOCAB.encode(text)
  assert ids == [105, 198, 191, 113, 105]
  assert tasks.BYTE_VOCAB.decode(ids) == "fünf"


def test_numbers_task_hand_example():
  task = numbers.make_numbers_task("numbers_tiny_test", num_train=2, num_eval=1, max_number=2,
                                   seed=3)
  rows = {split: data.examples(task, split, input_len=16, target_len=16)
          for split in ("train", "validation")}
  ids = sorted(e["example_id"] for split in rows.values() for e in split)
  assert ids == [0, 1, 2]  # Without replacement: the whole range, split disjointly.
  by_id = {e["example_id"]: e for split in rows.values() for e in split}
  assert by_id[1]["inputs_pretokenized"] == "eins"
  assert by_id[1]["targets"].tolist() == [114, 113, 104, 1]  # "one" + EOS
  assert by_id[0]["targets_pretokenized"] == "zero"


def test_numbers_sampling_deterministic_and_seeded():
  a = numbers.sample_numbers(num_train=50, num_eval=10, max_number=999, seed=7)
  b = numbers.sample_numbers(num_train=50, num_eval=10, max_number=999, seed=7)
  c = numbers.sample_numbers(num_train=50, num_eval=10, max_number=999, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert not set(a[0].tolist()) & set(a[1].tolist())
  with pytest.raises(RestJaxError, match="raise max_number"):
    numbers.sample_numbers(num_train=10, num_eval=2, max_number=10, seed=0)


def test_examples_deterministic_and_sharded(numbers_small):
  task = tasks.get_task("numbers_de_en_small")
  again = data.examples(task, "validation", input_len=64, target_len=64)
  assert [e["example_id"] for e in again] == [e["example_id"]
                                              for e in numbers_small["validation"]]
  shards = [data.examples(task, "validation", input_len=64, target_len=64, shard_index=i,
                          num_shards=2) for i in range(2)]
  ids = [[e["example_id"] for e in s] for s in shards]
  full = [e["example_id"] for e in numbers_small["validation"]]
  assert ids[0] == full[0::2] and ids[1] == full[1::2]


def test_examples_too_long_raises():
  task = tasks.get_task("numbers_de_en_small")
  with pytest.raises(RestJaxError) as info:
    data.examples(task, "validation", input_len=64, target_len=5)
  assert "target_len=5" in str(info.value) and "raise" in str(info.value)
  with pytest.raises(RestJaxError, match="no split"):
    data.examples(task, "nonexistent", input_len=64, target_len=64)


def test_arith_problem_indexing_exhaustive():
  m = 9
  assert arith.num_problems(m) == 100 + 55
  assert arith.problem(0, m) == ("0+0=", "0")
  assert arith.problem(23, m) == ("2+3=", "5")
  assert [arith.problem(100 + j, m) for j in range(4)] == [
      ("0-0=", "0"), ("1-0=", "1"), ("1-1=", "0"), ("2-0=", "2")]
  assert arith.problem(154, m) == ("9-9=", "0")
  prompts = [arith.problem(i, m) for i in range(arith.num_problems(m))]
  assert len({p for p, _ in prompts}) == 155
  for prompt, answer in prompts:
    a, op, b = prompt[:-1].partition("+") if "+" in prompt else prompt[:-1].partition("-")
    assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_arith_small_task_features():
  task = tasks.get_task("arith_small")
  train = data.examples(task, "train", input_len=16, target_len=8)
  evaluation = data.examples(task, "validation", input_len=16, target_len=8)
  assert (len(train), len(evaluation)) == (256, 64)
  ids = [e["example_id"] for e in train + evaluation]
  assert len(set(ids)) == 320
  for e in train[:30]:
    prompt, answer = arith.problem(e["example_id"], 99)
    assert e["inputs_pretokenized"] == prompt and e["targets_pretokenized"] == answer
    assert e["inputs"].tolist() == _bytes_ids(prompt)  # Decoder-only: no EOS on the prompt.
    assert e["targets"].tolist() == _bytes_ids(answer) + [1]
  same = arith.make_arith_task("arith_small_again", num_train=256, num_eval=64, max_operand=99,
                               seed=0)
  assert [e["example_id"] for e in data.examples(same, "train", input_len=16, target_len=8)] \
      == [e["example_id"] for e in train]


def test_get_task_unknown_and_registry():
  assert tasks.get_task("numbers_de_en").name == "numbers_de_en"
  assert tasks.get_task("arith").output_features["inputs"].add_eos is False
  with pytest.raises(RestJaxError) as info:
    tasks.get_task("no_such_task")
  assert "numbers_de_en" in str(info.value) and "register" in str(info.value)


def test_unlabeled_split_is_disjoint_and_keeps_train_and_eval_draws():
  with_pool = numbers.sample_numbers(num_train=50, num_eval=20, max_number=999, seed=3,
                                     num_unlabeled=300)
  without = numbers.sample_numbers(num_train=50, num_eval=20, max_number=999, seed=3)
  np.testing.assert_array_equal(with_pool[0], without[0])
  np.testing.assert_array_equal(with_pool[1], without[1])
  train, evaluation, pool = (set(x.tolist()) for x in with_pool)
  assert len(pool) == 300 and not pool & (train | evaluation)
  task = arith.make_arith_task("arith_pool_test", num_train=30, num_eval=10, max_operand=20,
                               seed=1, num_unlabeled=40)
  ids = {split: {e["example_id"] for e in data.examples(task, split, input_len=12,
                                                        target_len=8)}
         for split in ("train", "validation", "unlabeled")}
  assert [len(v) for v in ids.values()] == [30, 10, 40]
  assert not (ids["train"] & ids["unlabeled"]) and not (ids["validation"] & ids["unlabeled"])


def test_test_split_is_disjoint_and_leaves_the_other_draws_alone():
  # Registered tasks keep their train / validation / unlabeled draws (sizes and seeds as before).
  before = numbers.sample_numbers(num_train=256, num_eval=64, max_number=999, seed=0)
  small = tasks.get_task("numbers_de_en_small")
  ids = {split: [e["example_id"] for e in data.examples(small, split, input_len=64,
                                                        target_len=64)]
         for split in ("train", "validation", "test")}
  assert ids["train"] == before[0].tolist() and ids["validation"] == before[1].tolist()
  assert len(ids["test"]) == 64 and not set(ids["test"]) & set(ids["train"] + ids["validation"])
  # Test comes from the end of the permutation: other splits never depend on it.
  drawn = np.random.default_rng(0).permutation(1000)
  assert ids["test"] == drawn[-64:].tolist()
  splits = tasks.base.sample_splits(num_train=30, num_eval=10, num_unlabeled=40, num_test=20,
                                    total=100, seed=1, what="things", fix="raise total")
  without = tasks.base.sample_splits(num_train=30, num_eval=10, num_unlabeled=40, num_test=0,
                                     total=100, seed=1, what="things", fix="raise total")
  for a, b in zip(splits[:3], without[:3]):
    np.testing.assert_array_equal(a, b)
  assert len(set(np.concatenate(splits).tolist())) == 100 and len(without[3]) == 0
  with pytest.raises(RestJaxError, match="num_test = 101 exceeds the 100 things; raise total"):
    tasks.base.sample_splits(num_train=30, num_eval=10, num_unlabeled=40, num_test=21,
                             total=100, seed=1, what="things", fix="raise total")
  for name in ("numbers_de_en", "arith", "arith_small"):
    task = tasks.get_task(name)
    assert task.num_input_examples("test") == task.num_input_examples("validation")
  arith_ids = {s: {e["example_id"] for e in data.examples(tasks.get_task("arith_small"), s,
                                                          input_len=12, target_len=8)}
               for s in ("train", "validation", "test")}
  assert not arith_ids["test"] & (arith_ids["train"] | arith_ids["validation"])
