"""numbers_de_en: translate a number written in German words into English words.

A small, offline stand-in for IWSLT De-En: source "dreiundzwanzig", target "twenty-three".
Byte vocabulary, encoder-decoder features (both sides end with EOS). The example id of a pair is
the number itself, so it is stable and unique across splits.
"""

from __future__ import annotations

import numpy as np
import seqio
from num2words import num2words

from rest_jax import tasks
from rest_jax.errors import RestJaxError


def sample_numbers(*, num_train: int, num_eval: int, max_number: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws disjoint train / eval numbers from [0, max_number] without replacement.

  Returns:
    int64 `[num_train]` and int64 `[num_eval]`, deterministic in the arguments.
  """
  if num_train < 1 or num_eval < 0:
    raise RestJaxError(f"numbers task: num_train={num_train} must be >= 1 and "
                       f"num_eval={num_eval} >= 0.")
  if num_train + num_eval > max_number + 1:
    raise RestJaxError(
        f"numbers task: num_train + num_eval = {num_train + num_eval} exceeds the "
        f"{max_number + 1} numbers in [0, {max_number}]; raise max_number or ask for fewer "
        "examples.")
  rng = np.random.default_rng(seed)
  drawn = rng.choice(max_number + 1, size=num_train + num_eval, replace=False).astype(np.int64)
  return drawn[:num_train], drawn[num_train:]


def _pairs(numbers: np.ndarray) -> tasks.SplitData:
  sources = [num2words(int(n), lang="de") for n in numbers]
  targets = [num2words(int(n), lang="en") for n in numbers]
  return sources, targets, np.asarray(numbers, dtype=np.int64)


def make_numbers_task(name: str, *, num_train: int, num_eval: int, max_number: int,
                      seed: int) -> seqio.Task:
  """German-words -> English-words number translation as a seqio Task (not registered).

  Args:
    name: the task name.
    num_train: size of the "train" split (D).
    num_eval: size of the "validation" split (D_eval), disjoint from train.
    max_number: numbers are drawn without replacement from [0, max_number].
    seed: seed of the numpy Generator that draws them.
  Returns:
    A Task with ENCDEC_FEATURES; "example_id" is the number.
  """
  train, evaluation = sample_numbers(num_train=num_train, num_eval=num_eval,
                                     max_number=max_number, seed=seed)
  return tasks.in_memory_task(
      name, build_splits=lambda: {"train": _pairs(train), "validation": _pairs(evaluation)},
      sizes={"train": num_train, "validation": num_eval},
      output_features=tasks.ENCDEC_FEATURES)


tasks.register(make_numbers_task("numbers_de_en", num_train=4000, num_eval=256,
                                 max_number=99_999, seed=0))
tasks.register(make_numbers_task("numbers_de_en_small", num_train=256, num_eval=64,
                                 max_number=999, seed=0))
