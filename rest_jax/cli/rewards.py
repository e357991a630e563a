"""The reward-model commands of the CLI: ``rest-jax train-reward`` and ``rest-jax serve-reward``.

  rest-jax train-reward --data WORKDIR_OR_JSONL --output_dir DIR [--model tiny] [--num_steps N]
  rest-jax serve-reward --reward chrf --port 8000 [--host H] [--token_env VAR] [--range LO HI]
      [--tls_cert PEM --tls_key PEM] [--insecure] [--workers N ...]  (see docs/reward-server.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from rest_jax import buckets, storage
from rest_jax.errors import RestJaxError

logger = logging.getLogger("rest_jax")


def add_parsers(sub: argparse._SubParsersAction) -> None:
  """Adds the train-reward and serve-reward subcommands."""
  tr = sub.add_parser("train-reward", help="train a learned reward model on scored pairs")
  tr.add_argument("--data", required=True, nargs="+",
                  help="ReST workdirs (their Grow records) and/or JSONL files of {source, "
                  "hypothesis, score[, example_id]}; duplicate pairs are dropped")
  tr.add_argument("--output_dir", required=True, help="new directory for the reward model")
  tr.add_argument("--model", default="tiny", help="encoder-decoder preset (tiny, small, ...)")
  tr.add_argument("--task", default=None, help="take the vocabulary of this task (default: bytes)")
  tr.add_argument("--init_from", default=None,
                  help="policy params checkpoint (same --model) whose trunk initialises the model, "
                  "or a reward-model directory to continue training")
  tr.add_argument("--num_steps", type=int, default=2000)
  tr.add_argument("--batch_size", type=int, default=64)
  tr.add_argument("--learning_rate", type=float, default=1e-3)
  tr.add_argument("--warmup_steps", type=int, default=100)
  tr.add_argument("--held_out_fraction", type=float, default=0.1)
  tr.add_argument("--input_len", type=int, default=64)
  tr.add_argument("--target_len", type=int, default=64)
  tr.add_argument("--seed", type=int, default=0)
  tr.add_argument("--ranking_weight", type=float, default=0.0,
                  help="weight of the in-batch pairwise ranking loss added to the cross-entropy")
  tr.add_argument("--weight_decay", type=float, default=0.0)
  tr.add_argument("--eval_every", type=int, default=0,
                  help="log the held-out Kendall tau every this many steps (0: at the end)")
  tr.add_argument("--export_arrays", default=None, metavar="NPZ",
                  help="only encode and split the pairs into this .npz (for "
                  "launch/fit_reward_arrays.py on an accelerator host), do not train")
  tr.add_argument("--no_progress", action="store_true", help="no progress bar")
  tr.add_argument("--range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                  help="declared range of the scores (mapped to [0, 1])")
  tr.add_argument("--log_level", default="INFO")
  sv = sub.add_parser("serve-reward", help="serve a reward over HTTP for reward='remote:URL'")
  sv.add_argument("--reward", required=True, help="reward spec: chrf, learned:DIR, py:mod:fn, ...")
  sv.add_argument("--host", default="127.0.0.1")
  sv.add_argument("--port", type=int, required=True)
  sv.add_argument("--token_env", default="",
                  help="env var holding a bearer token that clients must send")
  sv.add_argument("--range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                  help="declared range of the served reward (mapped to [0, 1])")
  sv.add_argument("--insecure", action="store_true",
                  help="allow a non-loopback --host without --token_env (trusted networks only)")
  sv.add_argument("--tls_cert", default=None, help="PEM certificate (chain): serve HTTPS")
  sv.add_argument("--tls_key", default=None, help="PEM private key of --tls_cert")
  _add_limit_flags(sv)
  sv.add_argument("--log_level", default="INFO")


def _add_limit_flags(sv: argparse.ArgumentParser) -> None:
  """One flag per field of rest_jax.rewards.httpserver.ServerLimits, with its default."""
  from rest_jax.rewards.httpserver import ServerLimits  # pylint: disable=g-import-not-at-top
  helps = {
      "workers": "requests handled at once",
      "max_queued": "connections waiting for a worker; more get HTTP 503 with Retry-After",
      "max_body_bytes": "larger request bodies get HTTP 413",
      "idle_timeout_s": "disconnect a client silent this long",
      "read_timeout_s": "disconnect a client whose request has not arrived within this",
      "retry_after_s": "Retry-After of a 503",
      "reward_threads": "calls into the reward at once (0: one per worker; 1: for a reward "
                        "that is not thread-safe)",
  }
  for field in dataclasses.fields(ServerLimits):
    sv.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                    help=f"{helps[field.name]} (default {field.default})")


def train_reward(args: argparse.Namespace) -> dict:
  """Runs `rest-jax train-reward`; prints and returns the metrics."""
  from rest_jax import tasks  # pylint: disable=g-import-not-at-top
  from rest_jax.models import get_preset  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import training  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top

  buckets.check_workdir(args.output_dir)
  if not args.export_arrays and storage.exists(storage.join(args.output_dir,
                                                            "reward_model.json")):
    raise RestJaxError(f"{args.output_dir} already holds a reward model; choose a new "
                       "--output_dir or delete it.")
  vocab = (tasks.get_task(args.task).output_features["targets"].vocabulary if args.task
           else seqio.ByteVocabulary())
  model = get_preset(args.model)
  if vocab.vocab_size > model.vocab_size:
    raise RestJaxError(f"the vocabulary has {vocab.vocab_size} tokens but preset {args.model!r} "
                       f"has vocab_size={model.vocab_size}; choose a larger preset.")
  cfg = training.RewardTrainConfig(
      num_steps=args.num_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
      warmup_steps=args.warmup_steps, held_out_fraction=args.held_out_fraction,
      input_len=args.input_len, target_len=args.target_len, seed=args.seed,
      ranking_weight=args.ranking_weight, weight_decay=args.weight_decay,
      eval_every=args.eval_every)
  pairs = training.load_scored_pairs(args.data, score_range=tuple(args.range))
  logger.info("train-reward: %d scored pairs from %s", len(pairs), ", ".join(args.data))
  if args.export_arrays:
    sizes = training.export_arrays(args.export_arrays, pairs, model=model, vocab=vocab, cfg=cfg)
    print(json.dumps(sizes))
    print(f"fit it with: python launch/fit_reward_arrays.py {args.export_arrays} "
          f"{args.output_dir} --num_steps {args.num_steps}")
    return sizes
  metrics = training.train_reward_model(pairs, model=model, vocab=vocab, cfg=cfg,
                                        output_dir=args.output_dir, init_from=args.init_from,
                                        progress=not args.no_progress)
  print(json.dumps(metrics))
  learned = f"learned:{storage.absolute(args.output_dir)}"
  print(f"use it with --gin.config.RunConfig.reward=\"'{learned}'\"")
  return metrics


def serve_reward(args: argparse.Namespace) -> None:
  """Runs `rest-jax serve-reward` until interrupted."""
  from rest_jax.config import RewardConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import build_reward, reward_label  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import server as server_lib  # pylint: disable=g-import-not-at-top

  token = None
  if args.token_env:
    token = os.environ.get(args.token_env)
    if not token:
      raise RestJaxError(f"--token_env names {args.token_env!r}, but that environment variable "
                         "is not set; export it first.")
  limits = server_lib.ServerLimits(**{f.name: getattr(args, f.name)
                                       for f in dataclasses.fields(server_lib.ServerLimits)})
  server_lib.check_bind(args.host, token, args.insecure)  # Before loading a reward model.
  config = RewardConfig(range=tuple(args.range))
  reward = build_reward(args.reward, config)
  server = server_lib.make_server(reward, host=args.host, port=args.port, token=token,
                       name=reward_label(args.reward, config), limits=limits,
                       insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key)
  host, port = server.server_address[:2]
  scheme = "https" if args.tls_cert else "http"
  print(f"serving reward {args.reward!r} on {scheme}://{host}:{port}/"
        f"{' (bearer token required)' if token else ''}", flush=True)
  try:
    server.serve_forever()
  finally:
    server.server_close()
