"""The ``rest-jax`` argument parser: every subcommand, its flags, defaults and examples."""

from __future__ import annotations

import argparse

from rest_jax.cli import convert as convert_cli
from rest_jax.cli import rewards as reward_commands

try:
  from importlib.metadata import PackageNotFoundError, version as _version
  VERSION = _version("rest_jax")
except (ImportError, PackageNotFoundError):  # A source checkout that is not installed.
  VERSION = "0.1.0"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Shows each flag's default (unless it is empty: None, False, []) and keeps the examples'
  line breaks."""

  def _get_help_string(self, action: argparse.Action) -> str:
    default = action.default
    if (default is None or default is False or default == [] or default == argparse.SUPPRESS
        or action.required):
      return action.help or ""
    return super()._get_help_string(action)


RUN_EPILOG = """\
configuration:
  --gin_file FILE     a gin file; repeat it to layer files (later files win). Paths are tried
                      as given, then under the repo's gin/ folder (experiments/smoke_cpu.gin).
  --gin.NAME=VALUE    one gin binding, applied after every file, e.g.
                      --gin.config.RunConfig.num_grow_steps=3
                      --gin.bc/config.TrainConfig.learning_rate=1e-3
                      --gin.TRAIN_FILE="'data/train.jsonl'"       (a macro of the gin files)
  Values are Python literals: numbers, True/False, [lists]. Strings need their own quotes
  inside the shell's: --gin.config.RunConfig.task="'arith_small'" (without the inner
  quotes gin reads arith_small as a name and fails).

examples:
  rest-jax run --workdir runs/smoke --gin_file gin/experiments/smoke_cpu.gin
  rest-jax run --workdir runs/seed1 --gin_file gin/experiments/smoke_cpu.gin \\
      --gin.config.RunConfig.seed=1
  rest-jax run --workdir runs/own --gin_file gin/experiments/user_files_smoke_cpu.gin \\
      --gin.TRAIN_FILE="'my/train.jsonl'" --gin.EVAL_FILE="'my/eval.jsonl'"
  rest-jax run --workdir runs/hf --gin_file gin/experiments/user_files_smoke_cpu.gin \\
      --gin_file ckpt/llama_gqa/model.gin          (after `rest-jax import`)

Rerunning the same command resumes the run in its workdir; a finished run is a no-op.
Results (the table, the summary) go to stdout, logs to stderr."""

_LOG_HELP = "log level: DEBUG also shows TensorFlow / XLA start-up messages"


def _log_level(p: argparse.ArgumentParser, default: str) -> None:
  p.add_argument("--log_level", default=default,
                 choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper, help=_LOG_HELP)


def _add_run(sub: argparse._SubParsersAction) -> None:
  run = sub.add_parser("run", help="run or resume a ReST experiment", epilog=RUN_EPILOG,
                       formatter_class=HelpFormatter,
                       description="Runs BC, then Grow and Improve steps, in a resumable workdir.")
  run.add_argument("--workdir", required=True, help="experiment directory (resumable)")
  run.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable; see below)")
  run.add_argument("--no_progress", action="store_true", help="hide progress bars")
  _log_level(run, "INFO")
  _multihost(run)


def _add_tools(sub: argparse._SubParsersAction) -> None:
  cc = sub.add_parser("compile-check", formatter_class=HelpFormatter,
                      help="compile Grow and Improve steps for a TPU/GPU topology ahead of time "
                      "and print per-device memory against HBM")
  cc.add_argument("--topology", action="append", required=True,
                  help="e.g. v5e:16x16, v4:2x2x2, v5p:4x4x4, h100:4x8 (repeatable)")
  cc.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  _log_level(cc, "WARNING")
  sw = sub.add_parser("sweep", help="one run per combination of swept gin bindings",
                      formatter_class=HelpFormatter)
  sw.add_argument("--root", required=True, help="sweep directory; run i goes to ROOT/<name>")
  sw.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  sw.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                  help="a gin binding and its values (repeatable; cartesian product)")
  sw.add_argument("--seeds", default=None, metavar="K",
                  help="also sweep config.RunConfig.seed over 0..K-1 (runs named ...,seed=N)")
  sw.add_argument("--share_grow", action="store_true",
                  help="per seed, start every run after the first from a copy of the first's BC "
                  "phase and Grow step 1 (sweeps over Improve-only bindings; local launcher)")
  sw.add_argument("--launcher", default="local", choices=("local", "tpu", "xpk", "slurm"))
  sw.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                  help="print the launcher commands, run nothing")
  sw.add_argument("launcher_args", nargs="*", help="after --: the launcher's options")
  _log_level(sw, "WARNING")
  cmp = sub.add_parser("compare", help="table + plot of several runs' summary.json (mean and "
                       "95%% interval across runs that differ only by seed)",
                       formatter_class=HelpFormatter)
  cmp.add_argument("workdirs", nargs="+", help="run workdirs, or sweep roots")
  cmp.add_argument("--out", default="", help="write the comparison plot (PNG) here")
  _log_level(cmp, "WARNING")
  ins = sub.add_parser("inspect", help="print Grow datasets' stats and examples",
                       formatter_class=HelpFormatter)
  ins.add_argument("workdir", help="a `rest-jax run` workdir (read only)")
  ins.add_argument("--num_examples", type=int, default=3, help="examples shown per Grow step")
  ins.add_argument("--jsonl", default=None, help="also export every record to this JSONL file")
  _log_level(ins, "WARNING")


RESCORE_EPILOG = """\
examples:
  rest-jax rescore runs/arith --reward exact_match --name exact
  rest-jax rescore runs/arith --reward py:my_rewards:partial_credit
  rest-jax rescore runs/numbers --reward learned:rm/numbers --reward_range -5,5
then train on the new version (from a copy of the BC phase and Grow sets, see docs/rewards.md):
  rest-jax run --workdir runs/arith_v1 ... --gin.config.ImproveConfig.reward_version=1

Chunks are never rewritten: version v lies beside each chunk (chunk-*.rewards-vV.npy), recorded
in each Grow folder's rewards.json. A rescore that fails midway leaves the recorded versions
intact; rerunning the same command continues it."""


def _multihost(p: argparse.ArgumentParser) -> None:
  multi = p.add_argument_group(
      "multi-host", "run the same command on every host; without these (or the REST_JAX_* "
      "environment variables) a TPU VM / SLURM cluster is detected, else one process runs")
  multi.add_argument("--coordinator_address", default=None, help="host 0's HOST:PORT "
                     "(env REST_JAX_COORDINATOR)")
  multi.add_argument("--num_processes", type=int, default=None,
                     help="number of processes (env REST_JAX_NUM_PROCESSES)")
  multi.add_argument("--process_id", type=int, default=None,
                     help="this process, 0..num_processes-1 (env REST_JAX_PROCESS_ID)")
  multi.add_argument("--heartbeat_timeout_s", type=int, default=None,
                     help="declare a silent host dead after this long (None: 100 s; env "
                     "REST_JAX_HEARTBEAT_TIMEOUT_S)")
  multi.add_argument("--barrier_timeout_s", type=float, default=None,
                     help="longest wait for the other hosts at a barrier (None: 1800 s)")


def _add_rescore(sub: argparse._SubParsersAction) -> None:
  rs = sub.add_parser("rescore", help="score a workdir's Grow sets with another reward, as a "
                      "new reward version", epilog=RESCORE_EPILOG, formatter_class=HelpFormatter)
  rs.add_argument("workdir", help="a `rest-jax run` workdir with finished Grow steps")
  rs.add_argument("--reward", required=True,
                  help="reward spec, as RunConfig.reward: a name (chrf, exact_match, ...), "
                  "learned:DIR, remote:URL or py:module:function")
  rs.add_argument("--name", default="", help="a label for the version (default: the spec)")
  rs.add_argument("--reward_range", default="0,1", metavar="LO,HI",
                  help="the reward's declared range (mapped to [0, 1], as RewardConfig.range)")
  rs.add_argument("--batch_size", type=int, default=1024, help="hypotheses per reward call")
  _log_level(rs, "INFO")
  _multihost(rs)


def _add_best_of_n(sub: argparse._SubParsersAction) -> None:
  bon = sub.add_parser("best-of-n", help="best-of-N reward of saved policies on D_eval",
                       formatter_class=HelpFormatter)
  bon.add_argument("workdir", nargs="?", default=None,
                   help="a `rest-jax run` workdir (read only); --workdir W works too")
  bon.add_argument("--workdir", dest="workdir_flag", default=None, help=argparse.SUPPRESS)
  bon.add_argument("--phase", default="bc,final",
                   help="comma-separated phases: bc, final, or gG_iI (e.g. g2_i2)")
  bon.add_argument("--n", default="1,2,4,8,16", help="comma-separated N values")
  bon.add_argument("--num_examples", type=int, default=0,
                   help="D_eval prompts (0: EvalConfig.num_examples of the run)")
  bon.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (None: the run's Grow temperature)")
  bon.add_argument("--seed", type=int, default=None, help="sampling seed (None: the run's)")
  bon.add_argument("--output", default=None, help="also write the results as JSON here")
  _log_level(bon, "WARNING")


def build_parser() -> argparse.ArgumentParser:
  """The ``rest-jax`` parser with every subcommand."""
  parser = argparse.ArgumentParser(
      prog="rest-jax", formatter_class=HelpFormatter,
      description="Reinforced Self-Training (ReST) of language models on JAX.",
      epilog="`rest-jax COMMAND --help` shows a command's flags; start with\n"
      "  rest-jax run --workdir runs/smoke --gin_file gin/experiments/smoke_cpu.gin")
  parser.add_argument("--version", action="version", version=f"rest-jax {VERSION}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  _add_run(sub)
  convert_cli.add_parsers(sub)
  _add_best_of_n(sub)
  _add_tools(sub)
  _add_rescore(sub)
  reward_commands.add_parsers(sub)
  for command in sub.choices.values():
    command.formatter_class = HelpFormatter
  return parser
