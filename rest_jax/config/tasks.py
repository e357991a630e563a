"""Prompt tasks over user files or TFDS datasets; ``rest_jax.tasks.from_config`` registers them."""

from __future__ import annotations

import dataclasses

from rest_jax.config.checks import one_of, require

TASK_KINDS = ("encdec", "decoder")  # Model families: "decoder" prompts get no EOS.


@dataclasses.dataclass(frozen=True)
class FileTaskConfig:
  """A task over local JSONL / TSV files; ``tasks.from_config`` registers it under ``name``.

  Each line (JSONL) or row (TSV with a header line) holds a prompt, an optional reference
  (the demonstration BC trains on) and an optional answer (metadata only a reward needs, e.g. a
  verifiable final answer); the target text is the reference, else the answer. Rows of
  ``train``, ``validation`` and ``test`` need one of them; ``unlabeled`` rows need only a
  prompt.
  """

  name: str = ""
  train: str = ""
  validation: str = ""
  unlabeled: str = ""  # Optional: prompts for Grow only (GrowConfig.unlabeled_split).
  test: str = ""  # Optional: the reported test split (never selected on); rows need a target.
  format: str = ""  # "jsonl" or "tsv"; "" guesses from the file extension.
  vocabulary: str = "byte"  # "byte" | "spm:/path/model" | "hf:/path/tokenizer.json[?pad=..]".
  kind: str = "encdec"  # The model family: "decoder" prompts get no EOS.
  prompt_field: str = "prompt"
  reference_field: str = "reference"
  answer_field: str = "answer"
  id_field: str = ""  # Optional int64 example ids; "" numbers the lines.
  prompt_template: str = "{prompt}"  # e.g. "<s>Question: {prompt}\nAnswer:".

  def __post_init__(self):
    require(bool(self.name), "FileTaskConfig.name is empty; name the task (RunConfig.task).")
    require(bool(self.train) and bool(self.validation),
             f"FileTaskConfig {self.name!r}: train and validation files are required.")
    one_of("FileTaskConfig.format ('' guesses from the file name)", self.format,
            ("", "jsonl", "tsv"))
    one_of("FileTaskConfig.kind", self.kind, TASK_KINDS)
    require("{prompt}" in self.prompt_template,
             f"FileTaskConfig.prompt_template {self.prompt_template!r} must contain {{prompt}}.")


@dataclasses.dataclass(frozen=True)
class TfdsTaskConfig:
  """A TFDS-backed task (rest_jax/tasks/tfds_tasks.py lists ``dataset``'s sources)."""

  name: str = ""
  dataset: str = ""  # "iwslt14_de_en" | "wmt20_zh_en" | "gsm8k".
  vocabulary: str = "byte"
  kind: str = "encdec"
  data_dir: str = ""  # TFDS data_dir; "" = TFDS's default (~/tensorflow_datasets).
  download: bool = False  # True lets TFDS download and prepare the dataset on first use.
  prompt_template: str = "{prompt}"

  def __post_init__(self):
    require(bool(self.name), "TfdsTaskConfig.name is empty; name the task (RunConfig.task).")
    one_of("TfdsTaskConfig.kind", self.kind, TASK_KINDS)
    require("{prompt}" in self.prompt_template,
             f"TfdsTaskConfig.prompt_template {self.prompt_template!r} must contain {{prompt}}.")
