"""From seqio datasets to what the sampler and the trainer consume.

* ``examples``: the examples of one split as a list of dicts (eval sets, Grow prompts).
* ``train_batches``: a seeded, endlessly repeating iterator of fixed-shape numpy batches that
  can start at any step, so a resumed phase sees exactly the batches an uninterrupted one would.
* ``pad_rows`` / ``detokenize``: token rows to a padded batch and generated ids back to text.

Nothing here truncates silently: an example longer than the configured lengths is an error that
names the length to raise.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rest_jax.errors import RestJaxError
from rest_jax.models.base import EOS_ID, PAD_ID

BATCH_KEYS = ("inputs", "targets", "reward", "behaviour_logprobs", "is_original", "example_id")
_TOO_LONG = "rest_jax: example longer than"
_EPOCH_SEED_STRIDE = 1_000_003
_FOREVER = 2**62


def task_dataset(task: seqio.Task, split: str, *, shard_index: int = 0,
                 num_shards: int = 1) -> tf.data.Dataset:
  """One pass over a split in a fixed order, untrimmed (lengths are checked downstream).

  Args:
    task: a seqio Task.
    split: "train" or "validation" (any split of the task's source).
    shard_index / num_shards: this host's shard (examples shard_index, shard_index +
      num_shards, ...).
  Returns:
    The task's preprocessed examples (variable-length "inputs" / "targets", texts, ids).
  """
  if split not in task.splits:
    raise RestJaxError(f"task {task.name!r} has no split {split!r}; it has "
                       f"{sorted(task.splits)}.")
  if not 0 <= shard_index < num_shards:
    raise RestJaxError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}).")
  shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  return task.get_dataset(sequence_length=None, split=split, shuffle=False,
                          shard_info=shard_info, num_epochs=1)


def _python(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return value.item()
  if isinstance(value, np.generic):
    return value.item()
  return value


def examples(task: seqio.Task, split: str, *, input_len: int, target_len: int,
             shard_index: int = 0, num_shards: int = 1) -> list[dict[str, Any]]:
  """The examples of one split (this host's shard), in a fixed order.

  Args:
    task: a seqio Task whose examples carry "example_id".
    split: "train" (Grow prompts) or "validation" (D_eval).
    input_len / target_len: the model's lengths; every example must fit.
    shard_index / num_shards: this host's shard.
  Returns:
    dicts with "inputs" int32 `[n_in]` and "targets" int32 `[n_tgt]` (unpadded, EOS included
    where the task adds it), "inputs_pretokenized" / "targets_pretokenized" (str),
    "example_id" (int), and any other features of the task.
  Raises:
    RestJaxError: an example does not fit (names the lengths to raise), or has no example_id.
  """
  dataset = task_dataset(task, split, shard_index=shard_index, num_shards=num_shards)
  out = []
  with _user_errors(f"task {task.name!r} split {split!r}"):
    for ex in dataset.as_numpy_iterator():
      row = {k: _python(v) for k, v in ex.items()}
      row["inputs"] = np.asarray(ex["inputs"], dtype=np.int32)
      row["targets"] = np.asarray(ex["targets"], dtype=np.int32)
      out.append(row)
  if out and "example_id" not in out[0]:
    raise RestJaxError(f"task {task.name!r} has no 'example_id' feature; add a preprocessor "
                       "that sets a stable, unique int64 example_id (ReST derives sampling "
                       "randomness from it).")
  longest_in = max((len(r["inputs"]) for r in out), default=0)
  longest_tgt = max((len(r["targets"]) for r in out), default=0)
  if longest_in > input_len or longest_tgt > target_len:
    raise RestJaxError(
        f"task {task.name!r} split {split!r} has examples of up to {longest_in} input tokens "
        f"and {longest_tgt} target tokens (EOS included), but input_len={input_len} and "
        f"target_len={target_len}; raise input_len to >= {longest_in} and target_len to >= "
        f"{longest_tgt} instead of truncating them.")
  return out


@contextlib.contextmanager
def _user_errors(what: str) -> Iterator[None]:
  """Turns tf.data's corrupt-file and too-long errors into RestJaxError."""
  try:
    yield
  except GeneratorExit:  # An abandoned iterator closing (possibly at interpreter exit).
    raise
  except tf.errors.DataLossError as e:
    raise RestJaxError(
        f"{what}: a data file is corrupt ({e.message.strip()[:200]}). If this is a Grow "
        "dataset, rest_jax.grow.dataset.verify_chunks(GROW_DIR) names the file: delete it and the "
        "directory's COMPLETED marker, and rerun; the Grow step regenerates that chunk.") from None
  except tf.errors.InvalidArgumentError as e:
    if _TOO_LONG not in str(e):
      raise
    detail = str(e)[str(e).index(_TOO_LONG):].split("]")[0]
    raise RestJaxError(f"{what}: {detail}") from None


def _normalize(ex: dict[str, tf.Tensor], input_len: int, target_len: int) -> dict[str, tf.Tensor]:
  """One example -> fixed shapes; fills the fields that plain D lacks (BC on D)."""

  def fit(x, length, name, dtype):
    x = tf.cast(x, dtype)
    check = tf.debugging.assert_less_equal(
        tf.size(x), length,
        message=f"{_TOO_LONG} {name}_len={length} ({name} tokens); raise {name}_len "
        "(RunConfig) so nothing is truncated")
    with tf.control_dependencies([check]):
      x = tf.pad(x, [[0, length - tf.size(x)]])
    return tf.ensure_shape(x, [length])

  out = {"inputs": fit(ex["inputs"], input_len, "input", tf.int32),
         "targets": fit(ex["targets"], target_len, "target", tf.int32)}
  out["reward"] = (tf.cast(ex["reward"], tf.float32) if "reward" in ex
                   else tf.constant(1.0, tf.float32))
  out["behaviour_logprobs"] = (
      fit(ex["behaviour_logprobs"], target_len, "target", tf.float32)
      if "behaviour_logprobs" in ex else tf.zeros([target_len], tf.float32))
  out["is_original"] = (tf.cast(ex["is_original"], tf.int32) if "is_original" in ex
                        else tf.constant(1, tf.int32))
  out["example_id"] = (tf.cast(ex["example_id"], tf.int64) if "example_id" in ex
                       else tf.constant(-1, tf.int64))
  return out


def train_batches(dataset: tf.data.Dataset, *, batch_size: int, seed: int, start_step: int = 0,
                  input_len: int, target_len: int,
                  shuffle_buffer_size: int = 16_384) -> Iterator[dict[str, np.ndarray]]:
  """Seeded, shuffled, endlessly repeating fixed-shape training batches.

  Epoch ``e`` is the dataset shuffled with seed (seed, e); epochs are concatenated and cut into
  batches (drop_remainder), so batch ``k`` is a pure function of (dataset, seed, batch_size, k).
  ``start_step=k`` jumps straight to batch ``k`` (counting the dataset once, skipping less than
  one epoch of examples): the same batches a fresh iterator yields after ``k`` batches.

  Args:
    dataset: unbatched examples with "inputs" and "targets" (variable length), and optionally
      "reward", "behaviour_logprobs" (one per target token), "is_original", "example_id".
    batch_size: examples per batch.
    seed: shuffle seed (>= 0).
    start_step: number of batches to skip.
    input_len / target_len: padded lengths; a longer example raises RestJaxError.
    shuffle_buffer_size: tf.data shuffle buffer (a full shuffle if >= the dataset size).
  Returns:
    An iterator of dicts: "inputs" int32 `[batch, input_len]`, "targets" int32
    `[batch, target_len]`, "reward" f32 `[batch]` (1 if absent), "behaviour_logprobs" f32
    `[batch, target_len]` (0 if absent), "is_original" int32 `[batch]` (1 if absent),
    "example_id" int64 `[batch]` (-1 if absent).
  """
  for key in ("inputs", "targets"):
    if key not in dataset.element_spec:
      raise RestJaxError(f"training dataset has no {key!r} feature (it has "
                         f"{sorted(dataset.element_spec)}).")
  if batch_size < 1 or start_step < 0 or seed < 0:
    raise RestJaxError(f"train_batches: batch_size={batch_size} must be >= 1, "
                       f"start_step={start_step} and seed={seed} >= 0.")
  what = "training data"
  with _user_errors(what):
    if not any(True for _ in dataset.take(1)):
      raise RestJaxError("the training dataset is empty: nothing passed the filters. Lower the "
                         "threshold, or check the task's train split and the rewards.")
    first_epoch, offset = 0, 0
    if start_step:
      size = int(dataset.cardinality())
      if size < 0:
        size = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
      first_epoch, offset = divmod(start_step * batch_size, size)

  base = dataset.map(lambda ex: _normalize(ex, input_len, target_len),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    return base.shuffle(shuffle_buffer_size, seed=seed * _EPOCH_SEED_STRIDE + e,
                        reshuffle_each_iteration=False)

  batches = (tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch).skip(offset)
             .batch(batch_size, drop_remainder=True).prefetch(2))

  def iterate() -> Iterator[dict[str, np.ndarray]]:
    with _user_errors(what):
      yield from batches.as_numpy_iterator()

  return iterate()


def pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  """Right-pads 1-D token arrays with PAD_ID into int32 `[len(rows), length]`."""
  out = np.full((len(rows), length), PAD_ID, dtype=np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row)[:length]
    out[i, :len(row)] = row
  return out


def detokenize(vocab: Any, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Decodes `[batch, max_len]` token ids, keeping `lengths[b]` tokens and dropping EOS."""
  texts = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)] if t not in (EOS_ID, PAD_ID)]
    texts.append(vocab.decode(ids))
  return texts
