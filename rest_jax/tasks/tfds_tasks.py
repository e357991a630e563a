"""TFDS-backed tasks for the ReST paper's translation settings and ReST-EM's GSM8K.

Which TFDS dataset holds what (TFDS 4.9):

* "iwslt14_de_en": TFDS has no IWSLT 2014. ``ted_multi_translate`` holds the same kind of data
  (TED talk transcripts with German and English among ~60 languages, Qi et al. 2018), with
  train / validation / test splits (all three used: "test" is the reported split); we keep the
  talks' sentences that have both "de" and "en".
  For the exact IWSLT14 split (fairseq's prepare-iwslt14.sh), bring it as TSV through
  config.FileTaskConfig instead.
* "wmt20_zh_en": TFDS has no WMT 2020 translate builder. ``wmt19_translate/zh-en`` holds the
  WMT19 Zh-En training corpora (news commentary, wiki titles, UN, CWMT: the bulk of WMT20's
  Zh-En training data) with newstest2018 as "validation"; it has no test split, so runs on it
  report validation only (a logged note says so).
* "gsm8k": ``gsm8k`` (question, answer = worked solution ending with "#### N"); GSM8K has no
  validation split, so "validation" reads its "test" split (as ReST-EM reports) and the task
  has no separate "test" split: its numbers are selected on, like the paper's.

Hendrycks' MATH is not in TFDS (``math_dataset`` is DeepMind's mathematics dataset): bring its
JSON as JSONL through config.FileTaskConfig (prompt_field "problem", reference_field
"solution"); gin/tasks/math_jsonl.gin does that.

Example ids are ``index * 4 + split_code`` (train 0, validation 1, test 2) over the split read
in TFDS's fixed file order (shuffle_files=False): stable for a given TFDS version and unique
across splits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from rest_jax.tasks import base

from rest_jax.tasks import vocabularies
from rest_jax.config import TfdsTaskConfig
from rest_jax.errors import RestJaxError

_NUM_CODES = 4

Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """Where a dataset lives in TFDS and how to read (prompt, target) pairs from it."""

  tfds_name: str
  splits: dict[str, str]  # rest_jax split -> TFDS split.
  pair: Callable[[Example], tuple[tf.Tensor, tf.Tensor]]  # example -> (prompt, target) strings.
  keep: Callable[[Example], tf.Tensor] | None = None  # Optional filter (scalar bool).


def _ted_text(ex: Example, language: str) -> tf.Tensor:
  found = tf.equal(ex["translations"]["language"], language)
  return tf.strings.reduce_join(tf.boolean_mask(ex["translations"]["translation"], found))


def _ted_has_de_en(ex: Example) -> tf.Tensor:
  languages = ex["translations"]["language"]
  return tf.logical_and(tf.reduce_any(tf.equal(languages, "de")),
                        tf.reduce_any(tf.equal(languages, "en")))


SOURCES: dict[str, TfdsSource] = {
    "iwslt14_de_en": TfdsSource(
        "ted_multi_translate",
        {"train": "train", "validation": "validation", "test": "test"},
        pair=lambda ex: (_ted_text(ex, "de"), _ted_text(ex, "en")), keep=_ted_has_de_en),
    "wmt20_zh_en": TfdsSource(
        "wmt19_translate/zh-en", {"train": "train", "validation": "validation"},
        pair=lambda ex: (ex["zh"], ex["en"])),
    "gsm8k": TfdsSource(
        "gsm8k", {"train": "train", "validation": "test"},
        pair=lambda ex: (ex["question"], ex["answer"])),
}


def _builder(config: TfdsTaskConfig, tfds_name: str) -> tfds.core.DatasetBuilder:
  kw = {"data_dir": config.data_dir} if config.data_dir else {}
  try:
    builder = tfds.builder(tfds_name, **kw)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise RestJaxError(f"TFDS has no dataset {tfds_name!r} ({e}); upgrade tensorflow-datasets "
                       "or bring the data as files (config.FileTaskConfig).") from None
  return builder


class _CountingSource(seqio.FunctionDataSource):
  """A FunctionDataSource whose split sizes come from TFDS's metadata, else from one pass."""

  def __init__(self, dataset_fn, *, splits: list[str], count: Callable[[str], int | None]):
    super().__init__(dataset_fn, splits=splits)
    self._count = count
    self._sizes: dict[str, int] = {}

  def num_input_examples(self, split: str) -> int:
    if split not in self._sizes:
      size = self._count(split)
      if size is None:
        dataset = self.get_dataset(split, shuffle=False)
        size = int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
      self._sizes[split] = size
    return self._sizes[split]


def _info_count(config: TfdsTaskConfig, source: TfdsSource, split: str) -> int | None:
  """The split's size from TFDS's metadata (None when filtered or unknown)."""
  if source.keep is not None:
    return None
  try:
    size = _builder(config, source.tfds_name).info.splits[source.splits[split]].num_examples
  except (KeyError, ValueError, AttributeError):
    return None
  return int(size) or None


def make_tfds_task(config: TfdsTaskConfig) -> seqio.Task:
  """The seqio Task of ``config.dataset`` (see SOURCES; not registered).

  Returns:
    A Task with splits "train", "validation" (and "test" where the dataset has one), features
    from ``config.vocabulary`` and ``config.kind``, texts "inputs_pretokenized" /
    "targets_pretokenized" and "example_id".
  Raises:
    RestJaxError: unknown dataset, or the TFDS data is not prepared and download is off.
  """
  if config.dataset not in SOURCES:
    raise RestJaxError(f"TfdsTaskConfig.dataset {config.dataset!r} is unknown; known: "
                       f"{sorted(SOURCES)} (other data: config.FileTaskConfig).")
  source = SOURCES[config.dataset]
  vocab = vocabularies.get_vocabulary(config.vocabulary)
  prefix, _, suffix = config.prompt_template.partition("{prompt}")
  codes = {split: code for code, split in enumerate(source.splits)}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # Fixed order, so example ids are stable; the Task shuffles.
    builder = _builder(config, source.tfds_name)
    if config.download:
      builder.download_and_prepare()
    try:
      dataset = builder.as_dataset(split=source.splits[split], shuffle_files=False)
    except AssertionError as e:  # TFDS asserts that the data was prepared.
      raise RestJaxError(
          f"TFDS dataset {source.tfds_name!r} is not prepared ({str(e)[:200]}); run "
          f"`tfds build {source.tfds_name}` (with --data_dir {config.data_dir or '<default>'}) "
          "or set TfdsTaskConfig.download = True.") from None

    def convert(index: tf.Tensor, ex: Example) -> Example:
      prompt, target = source.pair(ex)
      return {"inputs": tf.strings.join([prefix, prompt, suffix]), "targets": target,
              "example_id": index * _NUM_CODES + codes[split]}

    dataset = dataset.enumerate()
    if source.keep is not None:
      dataset = dataset.filter(lambda index, ex: source.keep(ex))
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return seqio.Task(
      config.name, source=_CountingSource(dataset_fn, splits=list(source.splits),
                                          count=lambda split: _info_count(config, source, split)),
      output_features=base.make_features(vocab, kind=config.kind),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
