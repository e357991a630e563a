"""arith: decoder-only integer arithmetic, "a+b=" -> "a+b" in decimal (and "a-b=" with a >= b).

A small, offline stand-in for ReST-EM's math tasks: exact match is a binary reward. Byte
vocabulary, decoder-only features (the prompt has no EOS; the target ends with EOS).

Problems are indexed in one space: index i < (M+1)^2 is "a+b=" with a = i // (M+1),
b = i % (M+1); the next (M+1)(M+2)/2 indices are "a-b=" with a >= b in triangular order.
The index is the example id: stable, and unique across splits.
"""

from __future__ import annotations

import math

import numpy as np
import seqio

from rest_jax.tasks import base


def num_problems(max_operand: int) -> int:
  """How many distinct problems have operands in [0, max_operand]."""
  m = max_operand + 1
  return m * m + m * (m + 1) // 2


def problem(index: int, max_operand: int) -> tuple[str, str]:
  """The (prompt, answer) texts of problem ``index``, e.g. ("12+7=", "19")."""
  m = max_operand + 1
  if not 0 <= index < num_problems(max_operand):
    raise ValueError(f"problem index {index} is out of range for max_operand={max_operand}")
  if index < m * m:
    a, b = divmod(index, m)
    return f"{a}+{b}=", str(a + b)
  j = index - m * m
  a = (math.isqrt(8 * j + 1) - 1) // 2
  b = j - a * (a + 1) // 2
  return f"{a}-{b}=", str(a - b)


def _pairs(indices: np.ndarray, max_operand: int) -> base.SplitData:
  texts = [problem(int(i), max_operand) for i in indices]
  return [p for p, _ in texts], [t for _, t in texts], np.asarray(indices, dtype=np.int64)


def make_arith_task(name: str, *, num_train: int, num_eval: int, max_operand: int,
                    seed: int, num_unlabeled: int = 0, num_test: int = 0) -> seqio.Task:
  """Addition / subtraction problems as a decoder-only seqio Task (not registered).

  Args:
    name: the task name.
    num_train: size of the "train" split (D).
    num_eval: size of the "validation" split (D_eval), disjoint from train.
    max_operand: operands lie in [0, max_operand]; subtraction keeps a >= b.
    seed: seed of the numpy Generator that draws problems without replacement.
    num_unlabeled: size of the "unlabeled" split: problems with no demonstration for BC,
      whose answer only the reward sees (ReST-EM's setting). 0 leaves the split out.
    num_test: size of the "test" split: reported, never selected on; disjoint from the others
      and drawn from the end of the permutation, so the other splits do not depend on it. 0
      leaves the split out.
  Returns:
    A Task with DECODER_FEATURES; "example_id" is the problem index.
  """
  train, evaluation, unlabeled, test = base.sample_splits(
      num_train=num_train, num_eval=num_eval, num_unlabeled=num_unlabeled, num_test=num_test,
      total=num_problems(max_operand), seed=seed,
      what=f"problems with operands in [0, {max_operand}]", fix="raise max_operand")
  splits = {"train": train, "validation": evaluation}
  if num_unlabeled:
    splits["unlabeled"] = unlabeled
  if num_test:
    splits["test"] = test
  return base.in_memory_task(
      name, build_splits=lambda: {k: _pairs(v, max_operand) for k, v in splits.items()},
      sizes={k: len(v) for k, v in splits.items()}, output_features=base.DECODER_FEATURES)


# ReST-EM's setting: few worked problems (D), many problems whose answer only the reward knows.
base.register(make_arith_task("arith", num_train=2000, num_eval=256, max_operand=99, seed=0,
                              num_unlabeled=4000, num_test=256))
base.register(make_arith_task("arith_small", num_train=256, num_eval=64, max_operand=99,
                              seed=0, num_test=64))
