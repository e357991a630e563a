"""``rest-jax import`` / ``rest-jax export``: checkpoints between HF, T5X and our orbax format.

  rest-jax import --from hf|t5x|orbax|auto SRC --to ORBAX_DIR [--preset P | --config JSON]
  rest-jax export --from ORBAX_DIR --to hf|t5x|orbax OUT [--preset P | --config JSON]

``import`` writes ORBAX_DIR/{model_config.json, params/, model.gin}; ``model.gin`` binds
``RunConfig.model`` to the imported architecture, ``RunConfig.init_checkpoint`` to ORBAX_DIR and
the task kind of tasks built from config (``FileTaskConfig`` / ``TfdsTaskConfig``) to the model
family's. When SRC has a tokenizer (``tokenizer.json``, else ``spiece.model`` /
``tokenizer.model``) it is copied into ORBAX_DIR and bound as those tasks' vocabulary; the token
rows of a ``tokenizer.json`` model are put in the run's id order (pad 0, eos 1; see
rest_jax/tasks/vocabularies.py). So ``rest-jax run --gin_file EXPERIMENT --gin_file
ORBAX_DIR/model.gin`` starts from it (model.gin last: its bindings win). T5X checkpoints carry no
architecture: pass ``--preset`` or ``--config`` (a model_config.json).
"""

from __future__ import annotations

import argparse
import dataclasses

from rest_jax import buckets, storage
from rest_jax.errors import RestJaxError

# Only light imports here: the parser is built on every `rest-jax` call.
GIN_FILE = "model.gin"
FORMATS = ("hf", "t5x", "orbax")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPM_FILES = ("spiece.model", "tokenizer.model")


def add_parsers(sub: argparse._SubParsersAction) -> None:
  """Adds the ``import`` and ``export`` subcommands to the ``rest-jax`` parser."""
  imp = sub.add_parser("import", help="convert an HF / T5X checkpoint into our orbax format")
  imp.add_argument("--from", dest="src_format", default="auto",
                   choices=("auto",) + FORMATS, help="format of SRC (default: detect)")
  imp.add_argument("src", help="checkpoint directory (HF model dir, t5x checkpoint_<step>)")
  imp.add_argument("--to", dest="dst", required=True, help="new orbax directory to write")
  exp = sub.add_parser("export", help="write an orbax (or any) checkpoint as HF / T5X / orbax")
  exp.add_argument("--from", dest="src", required=True,
                   help="checkpoint to read: an orbax dir, or hf:/p, t5x:/p, orbax:/p")
  exp.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
  exp.add_argument("dst", help="new output directory")
  for p in (imp, exp):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="model preset (for T5X sources)")
    group.add_argument("--config", default=None, help="model_config.json (for T5X sources)")
    p.add_argument("--log_level", default="WARNING")


def _model_config(args: argparse.Namespace):
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  from rest_jax.models import get_preset  # pylint: disable=g-import-not-at-top
  if args.preset:
    return get_preset(args.preset)
  if args.config:
    return convert.read_model_config(args.config)
  return None


def _gin_value(value) -> str:
  return repr(value) if not isinstance(value, bool) else str(value)


def model_gin(config, init_checkpoint: str, vocabulary: str = "") -> str:
  """Gin bindings that make ``RunConfig.model`` this config and start from the checkpoint.

  Tasks built from config (FileTaskConfig / TfdsTaskConfig) get the model family's kind and,
  if given, ``vocabulary`` (the checkpoint's tokenizer spec); registered tasks keep theirs.
  """
  lines = ["# Written by `rest-jax import`: the imported architecture and its checkpoint.",
           "# Pass it after the experiment's gin files: its bindings win.",
           "from __gin__ import dynamic_registration", "from rest_jax import config",
           "from rest_jax import models", "",
           "config.RunConfig.model = @models.ModelConfig()",
           f"config.RunConfig.init_checkpoint = {init_checkpoint!r}"]
  lines += [f"models.ModelConfig.{f.name} = {_gin_value(getattr(config, f.name))}"
            for f in dataclasses.fields(config)]
  lines += ["", "# Tasks built from config (your files, TFDS) match the model family"
            + (" and use the checkpoint's tokenizer." if vocabulary else ".")]
  for task_config in ("FileTaskConfig", "TfdsTaskConfig"):
    lines.append(f"config.{task_config}.kind = {config.kind!r}")
    if vocabulary:
      lines.append(f"config.{task_config}.vocabulary = {vocabulary!r}")
  return "\n".join(lines) + "\n"


def _source_dir(src: str) -> str:
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  return convert.parse_spec(src)[1]


def _hf_vocabulary(path: str):
  """The tokenizer.json at ``path`` as a vocabulary and its query ("" or "?pad=<unk>")."""
  from rest_jax.tasks import vocabularies  # pylint: disable=g-import-not-at-top
  try:
    return vocabularies.HFTokenizerVocabulary(path), ""
  except RestJaxError as e:
    if "no pad token" not in str(e):
      raise
    return vocabularies.HFTokenizerVocabulary(path, pad_token="<unk>"), "?pad=<unk>"


def find_tokenizer(src_dir: str) -> tuple[str, str]:
  """("hf" | "spm", file name) of the tokenizer in a checkpoint directory, or ("", "")."""
  for kind, names in (("hf", HF_TOKENIZER_FILES[:1]), ("spm", SPM_FILES)):
    for name in names:
      if storage.exists(storage.join(src_dir, name)):
        return kind, name
  return "", ""


def run_import(args: argparse.Namespace) -> None:
  """Reads SRC in any format and writes our orbax directory, its tokenizer and model.gin."""
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  from rest_jax.models import abstract_model, count_params  # pylint: disable=g-import-not-at-top
  buckets.check_workdir(args.dst)
  dst = storage.absolute(args.dst)
  if storage.exists(dst):
    raise RestJaxError(f"--to {dst} already exists; choose a new directory or delete it.")
  config, params = convert.load_checkpoint(args.src, format=args.src_format,
                                           config=_model_config(args))
  src_dir = _source_dir(args.src)
  kind, name = find_tokenizer(src_dir)
  query = ""
  if kind == "hf":  # Token rows in the run's id order (pad 0, eos 1), as the run reads them.
    vocab, query = _hf_vocabulary(storage.join(src_dir, name))
    params = convert.reorder_vocab(config, params, vocab.model_to_hf)
  convert.save_orbax(dst, config, params)
  vocabulary = ""
  if kind:
    copied = HF_TOKENIZER_FILES if kind == "hf" else (name,)
    for file in copied:
      if storage.exists(storage.join(src_dir, file)):
        data = storage.read_bytes(storage.join(src_dir, file))
        storage.write_bytes(storage.join(dst, file), data)
    vocabulary = f"{kind}:{storage.join(dst, name)}{query}"
  storage.write_text(storage.join(dst, GIN_FILE), model_gin(config, f"orbax:{dst}", vocabulary))
  tokenizer = f"tokenizer {vocabulary}" if vocabulary else "no tokenizer found in the source"
  print(f"imported {args.src} ({config.kind}, {count_params(abstract_model(config)):,} params; "
        f"{tokenizer}) -> {dst}; start a run from it with --gin_file EXPERIMENT.gin "
        f"--gin_file {storage.join(dst, GIN_FILE)}")


def run_export(args: argparse.Namespace) -> None:
  """Reads any checkpoint and writes it in the ``--to`` format."""
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  config, params = convert.load_checkpoint(args.src, config=_model_config(args))
  save = {"hf": convert.save_hf, "t5x": convert.save_t5x, "orbax": convert.save_orbax}
  buckets.check_workdir(args.dst)
  dst = storage.absolute(args.dst)
  save[args.dst_format](dst, config, params)
  print(f"exported {args.src} as {args.dst_format} -> {dst}")
