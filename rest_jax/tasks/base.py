"""The task helpers every task module uses: the byte vocabulary, features, in-memory tasks and
the ``seqio.TaskRegistry`` lookup (re-exported by ``rest_jax.tasks``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rest_jax.errors import RestJaxError

# Byte-level vocabulary: 0 pad, 1 eos, 2 unk, byte b -> b + 3 (259 ids).
BYTE_VOCAB = seqio.ByteVocabulary()

# Encoder-decoder tasks: both sides end with EOS.
ENCDEC_FEATURES = {
    "inputs": seqio.Feature(BYTE_VOCAB, add_eos=True),
    "targets": seqio.Feature(BYTE_VOCAB, add_eos=True),
}
# Decoder-only tasks: the prompt runs straight into the target, which ends with EOS.
DECODER_FEATURES = {
    "inputs": seqio.Feature(BYTE_VOCAB, add_eos=False),
    "targets": seqio.Feature(BYTE_VOCAB, add_eos=True),
}

SPLITS = ("train", "validation")  # Every task has these; "test" and "unlabeled" are optional.
TEST_SPLIT = "test"
_MAX_LISTED_NAMES = 40


SplitData = tuple[list[str], list[str], np.ndarray]  # (sources, targets, example_ids int64 [n])


def sample_splits(*, num_train: int, num_eval: int, num_unlabeled: int, num_test: int,
                  total: int, seed: int, what: str, fix: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Disjoint indices in [0, total) for train, validation, unlabeled and test, int64 each.

  One seeded permutation: train, validation and unlabeled are its head (in that order), test
  is its tail, so adding or resizing the test split never moves the other three draws.

  Raises:
    RestJaxError: a negative size, num_train < 1, or more examples asked for than ``total``.
  """
  if num_train < 1 or min(num_eval, num_unlabeled, num_test) < 0:
    raise RestJaxError(f"task sizes: num_train={num_train} must be >= 1 and num_eval="
                       f"{num_eval}, num_unlabeled={num_unlabeled}, num_test={num_test} >= 0.")
  asked = num_train + num_eval + num_unlabeled + num_test
  if asked > total:
    raise RestJaxError(
        f"num_train + num_eval + num_unlabeled + num_test = {asked} exceeds the {total} "
        f"{what}; {fix} or ask for fewer examples.")
  drawn = np.random.default_rng(seed).permutation(total).astype(np.int64)
  head = np.cumsum([num_train, num_eval, num_unlabeled])
  return (drawn[:head[0]], drawn[head[0]:head[1]], drawn[head[1]:head[2]],
          drawn[total - num_test:])


def in_memory_task(name: str, *, build_splits: Callable[[], dict[str, SplitData]],
                   sizes: dict[str, int], output_features: dict[str, seqio.Feature]) -> seqio.Task:
  """A seqio Task over in-memory text pairs (nothing is downloaded or read from disk).

  Args:
    name: task name (not registered here; see ``register``).
    build_splits: returns split -> (sources, targets, example_ids int64 `[n]`); called once,
      on first use, so that importing the package stays cheap.
    sizes: split -> number of examples (what ``build_splits`` will return).
    output_features: the "inputs" / "targets" features (vocabulary, add_eos).
  Returns:
    A Task whose examples carry the tokenized features, the "_pretokenized" texts and
    "example_id".
  """
  build = functools.lru_cache(maxsize=None)(build_splits)

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # In-memory lists: order is fixed; the Task shuffles if asked.
    sources, targets, ids = build()[split]
    if not len(sources) == len(targets) == len(ids) == sizes[split]:
      raise ValueError(f"task {name}: split {split} does not have {sizes[split]} examples")
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.constant(list(sources), dtype=tf.string),
        "targets": tf.constant(list(targets), dtype=tf.string),
        "example_id": tf.constant(np.asarray(ids, dtype=np.int64)),
    })

  source = seqio.FunctionDataSource(dataset_fn, splits=list(sizes),
                                    num_input_examples=dict(sizes))
  return seqio.Task(
      name, source=source, output_features=output_features,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


def register(task: seqio.Task) -> seqio.Task:
  """Adds ``task`` to ``seqio.TaskRegistry`` under its name, replacing an earlier copy.

  Replacing keeps module reloads (tests, notebooks) from failing on a duplicate name.
  """
  seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)
  return task


def known_task_names() -> list[str]:
  """Names of every task in ``seqio.TaskRegistry``, sorted."""
  return sorted(seqio.TaskRegistry.names())


def get_task(name: str) -> seqio.Task:
  """Returns the registered seqio Task called ``name``.

  Raises:
    RestJaxError: no task of that name is registered; the message lists the known names and
      how to register a task.
  """
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  names: Sequence[str] = known_task_names()
  listed = ", ".join(names[:_MAX_LISTED_NAMES])
  if len(names) > _MAX_LISTED_NAMES:
    listed += f", ... ({len(names) - _MAX_LISTED_NAMES} more)"
  raise RestJaxError(
      f"task {name!r} is not registered. Known tasks: {listed}. To add a task, register it "
      "with seqio.TaskRegistry.add(...) (or rest_jax.tasks.register(seqio.Task(...))) in a "
      "module that is imported before the run starts (e.g. from a gin file with "
      "`import my_tasks`); embedded tasks are built with rest_jax.tasks.numbers."
      "make_numbers_task / rest_jax.tasks.arith.make_arith_task.")


def make_features(vocabulary: seqio.Vocabulary, *, kind: str) -> dict[str, seqio.Feature]:
  """The "inputs" / "targets" features of a task for ``kind`` ("encdec" or "decoder").

  Targets end with EOS; encoder-decoder prompts too, decoder-only prompts run straight into
  the target (as ENCDEC_FEATURES / DECODER_FEATURES do for the byte vocabulary).
  """
  return {"inputs": seqio.Feature(vocabulary, add_eos=kind == "encdec"),
          "targets": seqio.Feature(vocabulary, add_eos=True)}
