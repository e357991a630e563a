"""seqio tasks: the embedded synthetic tasks and the name lookup used by the run config.

Every rest_jax task yields examples with "inputs" / "targets" (token ids), their texts
"inputs_pretokenized" / "targets_pretokenized", and an int64 "example_id" that is stable and
unique within the task across splits. Splits: "train" (D) and "validation" (D_eval: every
selection: early stopping, best checkpoints), disjoint; optionally "test" (reported, never
selected on) and "unlabeled" (Grow prompts without demonstrations), disjoint from both.

Importing this package registers the embedded tasks ("numbers_de_en", "numbers_de_en_small",
"arith", "arith_small") in ``seqio.TaskRegistry``; tasks registered there by other code (for
example tfds-backed tasks in a module imported through gin) are found by ``get_task`` too.
Tasks over users' files (tasks/files.py) and TFDS datasets (tasks/tfds_tasks.py) are declared
in gin as config.FileTaskConfig / config.TfdsTaskConfig and registered by ``from_config``.
"""

from __future__ import annotations

from rest_jax.errors import RestJaxError
from rest_jax.tasks.base import (BYTE_VOCAB, DECODER_FEATURES, ENCDEC_FEATURES, SPLITS,
                                 TEST_SPLIT, SplitData, get_task, in_memory_task,
                                 known_task_names, make_features, register)
# Registration of the embedded tasks (importing these modules registers them).
from rest_jax.tasks import arith, files, numbers, tfds_tasks  # noqa: F401

__all__ = ["BYTE_VOCAB", "DECODER_FEATURES", "ENCDEC_FEATURES", "SPLITS", "TEST_SPLIT",
           "SplitData", "from_config", "get_task", "in_memory_task", "known_task_names",
           "make_features", "register"]


def from_config(task_config) -> str:
  """Builds the task a FileTaskConfig / TfdsTaskConfig describes, registers it, returns its name.

  In gin: ``config.RunConfig.task = @tasks.from_config()`` with
  ``tasks.from_config.task_config = @config.FileTaskConfig()``; the task is registered when
  the RunConfig is built, i.e. at run start, on every host.
  """
  from rest_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if isinstance(task_config, config_lib.FileTaskConfig):
    return register(files.make_file_task(task_config)).name
  if isinstance(task_config, config_lib.TfdsTaskConfig):
    return register(tfds_tasks.make_tfds_task(task_config)).name
  raise RestJaxError(f"tasks.from_config got {type(task_config).__name__}; pass a "
                     "config.FileTaskConfig or config.TfdsTaskConfig.")
