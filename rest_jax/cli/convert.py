"""``rest-jax import`` / ``rest-jax export``: checkpoints between HF, T5X and our orbax format.

  rest-jax import --from hf|t5x|orbax|auto SRC --to ORBAX_DIR [--preset P | --config JSON]
  rest-jax export --from ORBAX_DIR --to hf|t5x|orbax OUT [--preset P | --config JSON]

``import`` writes ORBAX_DIR/{model_config.json, params/, model.gin}; ``model.gin`` binds
``RunConfig.model`` to the imported architecture and ``RunConfig.init_checkpoint`` to ORBAX_DIR,
so ``rest-jax run --gin_file ... --gin_file ORBAX_DIR/model.gin`` starts from it. T5X checkpoints
carry no architecture: pass ``--preset`` or ``--config`` (a model_config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from rest_jax import storage
from rest_jax.errors import RestJaxError

# Only light imports here: the parser is built on every `rest-jax` call.
GIN_FILE = "model.gin"
FORMATS = ("hf", "t5x", "orbax")


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


def model_gin(config, init_checkpoint: str) -> str:
  """Gin bindings that make ``RunConfig.model`` this config and start from the checkpoint."""
  lines = ["# Written by `rest-jax import`: the imported architecture and its checkpoint.",
           "from __gin__ import dynamic_registration", "from rest_jax import config",
           "from rest_jax import models", "",
           "config.RunConfig.model = @models.ModelConfig()",
           f"config.RunConfig.init_checkpoint = {init_checkpoint!r}"]
  lines += [f"models.ModelConfig.{f.name} = {_gin_value(getattr(config, f.name))}"
            for f in dataclasses.fields(config)]
  return "\n".join(lines) + "\n"


def run_import(args: argparse.Namespace) -> None:
  """Reads SRC in any format and writes our orbax directory plus model.gin."""
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  from rest_jax.models import abstract_model, count_params  # pylint: disable=g-import-not-at-top
  dst = storage.absolute(args.dst)
  if storage.exists(dst):
    raise RestJaxError(f"--to {dst} already exists; choose a new directory or delete it.")
  config, params = convert.load_checkpoint(args.src, format=args.src_format,
                                           config=_model_config(args))
  convert.save_orbax(dst, config, params)
  storage.write_text(storage.join(dst, GIN_FILE), model_gin(config, f"orbax:{dst}"))
  print(f"imported {args.src} ({config.kind}, {count_params(abstract_model(config)):,} params) "
        f"-> {dst}; "
        f"start a run from it with --gin_file {storage.join(dst, GIN_FILE)}")


def run_export(args: argparse.Namespace) -> None:
  """Reads any checkpoint and writes it in the ``--to`` format."""
  from rest_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  config, params = convert.load_checkpoint(args.src, config=_model_config(args))
  save = {"hf": convert.save_hf, "t5x": convert.save_t5x, "orbax": convert.save_orbax}
  save[args.dst_format](os.path.abspath(args.dst), config, params)
  print(f"exported {args.src} as {args.dst_format} -> {os.path.abspath(args.dst)}")
