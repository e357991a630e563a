"""numbers_de_en: translate a number written in German words into English words.

A small, offline stand-in for IWSLT De-En: source "dreiundzwanzig", target "twenty-three".
Byte vocabulary, encoder-decoder features (both sides end with EOS). The example id of a pair is
the number itself, so it is stable and unique across splits.
"""

from __future__ import annotations

import numpy as np
import seqio
from num2words import num2words

from rest_jax.tasks import base


def sample_numbers(*, num_train: int, num_eval: int, max_number: int, seed: int,
                   num_unlabeled: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws disjoint train / eval / unlabeled numbers from [0, max_number] without replacement.

  Returns:
    int64 `[num_train]`, `[num_eval]` and `[num_unlabeled]`, deterministic in the arguments
    (the train and eval draws do not depend on num_unlabeled).
  """
  train, evaluation, unlabeled, _ = base.sample_splits(
      num_train=num_train, num_eval=num_eval, num_unlabeled=num_unlabeled, num_test=0,
      total=max_number + 1, seed=seed, what=f"numbers in [0, {max_number}]",
      fix="raise max_number")
  return train, evaluation, unlabeled


def _pairs(numbers: np.ndarray) -> base.SplitData:
  sources = [num2words(int(n), lang="de") for n in numbers]
  targets = [num2words(int(n), lang="en") for n in numbers]
  return sources, targets, np.asarray(numbers, dtype=np.int64)


def make_numbers_task(name: str, *, num_train: int, num_eval: int, max_number: int,
                      seed: int, num_unlabeled: int = 0, num_test: int = 0) -> seqio.Task:
  """German-words -> English-words number translation as a seqio Task (not registered).

  Args:
    name: the task name.
    num_train: size of the "train" split (D).
    num_eval: size of the "validation" split (D_eval), disjoint from train.
    max_number: numbers are drawn without replacement from [0, max_number].
    seed: seed of the numpy Generator that draws them.
    num_unlabeled: size of the "unlabeled" split: prompts without a demonstration for BC, whose
      English rendering is known only to the reward (like the final answers of ReST-EM's math
      problems). 0 leaves the split out.
    num_test: size of the "test" split: reported, never selected on; disjoint from the others
      and drawn from the end of the permutation, so the other splits do not depend on it. 0
      leaves the split out.
  Returns:
    A Task with ENCDEC_FEATURES; "example_id" is the number.
  """
  train, evaluation, unlabeled, test = base.sample_splits(
      num_train=num_train, num_eval=num_eval, num_unlabeled=num_unlabeled, num_test=num_test,
      total=max_number + 1, seed=seed, what=f"numbers in [0, {max_number}]",
      fix="raise max_number")
  splits = {"train": train, "validation": evaluation}
  if num_unlabeled:
    splits["unlabeled"] = unlabeled
  if num_test:
    splits["test"] = test
  return base.in_memory_task(
      name, build_splits=lambda: {k: _pairs(v) for k, v in splits.items()},
      sizes={k: len(v) for k, v in splits.items()}, output_features=base.ENCDEC_FEATURES)


# D is small (250 demonstrations) and 4000 more prompts come without one: the setting where
# ReST's reward-filtered self-generated data has something to teach that BC on D cannot.
base.register(make_numbers_task("numbers_de_en", num_train=250, num_eval=256,
                                max_number=99_999, seed=0, num_unlabeled=4000, num_test=256))
base.register(make_numbers_task("numbers_de_en_small", num_train=256, num_eval=64,
                                max_number=999, seed=0, num_test=64))
