"""Training data that does not depend on the number of hosts.

Every host iterates the same global batch stream (``data.train_batches`` at the global batch
size) and keeps only the rows its devices hold (``host_batches``), so global batch k is the same
whatever the host count. The Grow dataset's chunk files differ with the host count (each host
writes its own), so ``canonical_order`` first puts its records in (example_id, sample_idx)
order: the shuffled training stream then depends only on the records, not on who wrote them.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf

from rest_jax.parallel import distributed
from rest_jax.tasks.data import BATCH_KEYS

def canonical_order(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """The records of a (finite, filtered) Grow dataset sorted by (example_id, sample_idx).

  Reads the numeric training features of every record into host memory once (texts are
  dropped); an original pair (sample_idx -1) comes before its samples.

  Args:
    dataset: unbatched Grow records with "example_id" and "sample_idx" (int64), variable-length
      "inputs" / "targets" / "behaviour_logprobs", "reward" and "is_original".
  Returns:
    an unbatched dataset with the features of ``data.BATCH_KEYS`` present in ``dataset``.
  """
  spec = dataset.element_spec
  keys = [k for k in BATCH_KEYS if k in spec]
  rows = list(dataset.map(lambda ex: {k: ex[k] for k in set(keys) | {"sample_idx"}})
              .as_numpy_iterator())
  rows.sort(key=lambda r: (int(r["example_id"]), int(r["sample_idx"])))
  signature = {k: spec[k] for k in keys}

  def generate() -> Iterator[dict[str, np.ndarray]]:
    for r in rows:
      yield {k: r[k] for k in keys}

  return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
      tf.data.experimental.assert_cardinality(len(rows)))


def host_batches(batches: Iterator[Mapping[str, np.ndarray]],
                 sharding: jax.sharding.Sharding) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch (all rows with one process).

  Args:
    batches: global batches ``{key: [global_batch, ...]}``, the same on every host.
    sharding: the batch sharding the rows go to (``Trainer.batch_sharding``).
  Yields:
    ``{key: [global_batch / process_count, ...]}``: the rows this process's devices hold.
  """
  rows = None
  for batch in batches:
    if jax.process_count() == 1:
      yield dict(batch)
      continue
    if rows is None:
      size = len(next(iter(batch.values())))
      rows = distributed.process_rows(sharding, size)
    yield {k: v[rows] for k, v in batch.items()}
