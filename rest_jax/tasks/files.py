"""Tasks over local JSONL / TSV files that users bring (config.FileTaskConfig).

JSONL: one JSON object per line. TSV: a header line naming the columns, then one row per
example (no quoting: fields hold no tabs or newlines). Field names are configurable; the target
text is the reference, else the answer (see FileTaskConfig). Files are read and checked once,
when the task is built (at run start): a missing file, a bad line or a missing field is a
RestJaxError naming the file, the line and the fix, before anything is written to the workdir.

Example ids: ``id_field`` values if given (ints, unique across the splits), else
``line_index * 4 + split_code`` (train 0, validation 1, unlabeled 2, test 3), which is stable
as long as the files do not change and unique across splits.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import seqio

from rest_jax import storage
from rest_jax.tasks import base

from rest_jax.tasks import vocabularies
from rest_jax.config import FileTaskConfig
from rest_jax.errors import RestJaxError

_SPLIT_CODES = {"train": 0, "validation": 1, "unlabeled": 2, "test": 3}
_NUM_CODES = 4


def _format(path: str, declared: str) -> str:
  if declared:
    return declared
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    return "jsonl"
  if ext in (".tsv", ".txt"):
    return "tsv"
  raise RestJaxError(f"cannot tell the format of {path} from its extension; set "
                     "FileTaskConfig.format = 'jsonl' or 'tsv'.")


def read_rows(path: str, *, fmt: str = "") -> list[tuple[int, dict[str, Any]]]:
  """(line number, row dict) of every non-empty line of a JSONL or TSV file.

  Raises:
    RestJaxError: the file is missing, a JSON line does not parse or is not an object, or a TSV
      row has another number of columns than the header.
  """
  if not storage.exists(path) or storage.isdir(path):
    raise RestJaxError(f"data file {path} does not exist; fix the path in FileTaskConfig "
                       "(train / validation / unlabeled / test).")
  fmt = _format(path, fmt)
  rows: list[tuple[int, dict[str, Any]]] = []
  header: list[str] | None = None
  with storage.open_read(path, "r") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\n").rstrip("\r")
      if not line.strip():
        continue
      if fmt == "jsonl":
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise RestJaxError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                             "each line of a JSONL file must be one JSON object.") from None
        if not isinstance(row, dict):
          raise RestJaxError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; "
                             'write each example as {"prompt": ..., "reference": ...}.')
      else:
        cells = line.split("\t")
        if header is None:
          header = cells
          continue
        if len(cells) != len(header):
          raise RestJaxError(f"{path}:{number}: {len(cells)} tab-separated columns, but the "
                             f"header line has {len(header)} ({header}); fix the row (fields "
                             "cannot hold tabs or newlines in TSV; use JSONL for those).")
        row = dict(zip(header, cells))
      rows.append((number, row))
  return rows


def _text(row: dict[str, Any], field: str) -> str | None:
  value = row.get(field) if field else None
  if value is None or value == "":
    return None
  return value if isinstance(value, str) else json.dumps(value)


def _split(config: FileTaskConfig, split: str, path: str) -> base.SplitData:
  sources, targets, ids = [], [], []
  for number, row in read_rows(path, fmt=config.format):
    prompt = _text(row, config.prompt_field)
    if prompt is None:
      raise RestJaxError(f"{path}:{number}: no {config.prompt_field!r} field (it has "
                         f"{sorted(row)}); add it, or set FileTaskConfig.prompt_field to the "
                         "field that holds the prompt.")
    target = _text(row, config.reference_field) or _text(row, config.answer_field)
    if target is None and split != "unlabeled":
      raise RestJaxError(
          f"{path}:{number}: no {config.reference_field!r} or {config.answer_field!r} field "
          f"(it has {sorted(row)}); {split} examples need a reference (or an answer): add "
          "one, set FileTaskConfig.reference_field / answer_field, or move the example to "
          "the unlabeled file.")
    if config.id_field:
      try:
        ids.append(int(row[config.id_field]))
      except (KeyError, TypeError, ValueError):
        raise RestJaxError(f"{path}:{number}: {config.id_field!r} is missing or not an "
                           f"integer ({row.get(config.id_field)!r}); give every example an "
                           "int id, or set FileTaskConfig.id_field = '' to number the "
                           "lines.") from None
    else:
      ids.append(len(sources) * _NUM_CODES + _SPLIT_CODES[split])
    sources.append(config.prompt_template.replace("{prompt}", prompt))
    targets.append(target or "")
  if not sources:
    raise RestJaxError(f"data file {path} has no examples; the {split} split needs at least one.")
  return sources, targets, np.asarray(ids, dtype=np.int64)


def read_splits(config: FileTaskConfig) -> dict[str, base.SplitData]:
  """split -> (prompts, targets, example ids int64 `[n]`) of every configured file.

  Raises:
    RestJaxError: see ``read_rows``; also a missing field or duplicate example ids.
  """
  paths = {"train": config.train, "validation": config.validation}
  if config.unlabeled:
    paths["unlabeled"] = config.unlabeled
  if config.test:
    paths["test"] = config.test
  splits = {split: _split(config, split, path) for split, path in paths.items()}
  seen: dict[int, str] = {}
  for split, (_, _, ids) in splits.items():
    for i in ids.tolist():
      if i in seen:
        raise RestJaxError(f"example id {i} ({config.id_field!r}) appears in {seen[i]} and in "
                           f"{paths[split]}; ids must be unique across train, validation, "
                           "unlabeled and test.")
      seen[i] = paths[split]
  return splits


def make_file_task(config: FileTaskConfig) -> seqio.Task:
  """The seqio Task over ``config``'s files (read and checked now; not registered).

  Returns:
    A Task with splits "train", "validation" (and "unlabeled", "test" if configured),
    features from ``config.vocabulary`` and ``config.kind``, and "example_id".
  """
  vocab = vocabularies.get_vocabulary(config.vocabulary)
  splits = read_splits(config)
  return base.in_memory_task(
      config.name, build_splits=lambda: splits,
      sizes={k: len(v[0]) for k, v in splits.items()},
      output_features=base.make_features(vocab, kind=config.kind))
