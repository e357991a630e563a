"""The `rest-jax` command line: flags, gin parsing, one call into the library.

  rest-jax run --workdir W --gin_file F [--gin_file F2 ...] [--gin.X=V ...]
  rest-jax inspect W [--num_examples K] [--jsonl PATH]
  rest-jax import --from hf|t5x|orbax|auto SRC --to ORBAX_DIR [--preset P | --config JSON]
  rest-jax export --from CHECKPOINT --to hf|t5x|orbax OUT [--preset P | --config JSON]
  rest-jax best-of-n --workdir W --phase bc,final [--n 1,2,4,8,16] [--output F.json]
  rest-jax compile-check --topology v5e:16x16 --gin_file F [--gin.X=V ...]
  rest-jax sweep --root R --gin_file F --sweep X=V1,V2 [...] [--seeds K]
                 [--launcher L --dry-run -- OPTS]
  rest-jax compare W1 W2 ... [--out compare.png]
  rest-jax train-reward --data W_OR_JSONL --output_dir DIR   (see rest_jax/cli/rewards.py)
  rest-jax serve-reward --reward chrf --port P [--token_env VAR]

This is the only module that imports gin. Gin files bind the frozen dataclasses of
``rest_jax.config`` (with ``from __gin__ import dynamic_registration``); rerunning the same
``run`` command resumes the experiment in its workdir.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from rest_jax.errors import RestJaxError  # pylint: disable=g-import-not-at-top

REPO_GIN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "gin")


def _split_gin_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """Pulls t5x-style ``--gin.X=V`` flags out of argv; returns (rest, bindings)."""
  rest, bindings = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" not in body:
        try:
          body = f"{body}={next(it)}"
        except StopIteration as e:
          raise RestJaxError(f"flag {arg} has no value; write it as --gin.NAME=VALUE.") from e
      name, value = body.split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def parse_run_config(gin_files: list[str], bindings: list[str]):
  """Parses gin files and bindings into a RunConfig; returns (config, operative config text)."""
  import gin  # pylint: disable=g-import-not-at-top
  from rest_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  for path in (os.getcwd(), REPO_GIN_DIR):
    gin.add_config_file_search_path(path)
  for path in gin_files:
    if not os.path.exists(path) and not os.path.exists(os.path.join(REPO_GIN_DIR, path)):
      raise RestJaxError(f"gin file {path!r} does not exist; pass a path to a .gin file "
                         f"(the shipped ones are under {REPO_GIN_DIR}).")
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)
  except (ValueError, KeyError, NameError, SyntaxError, ImportError) as e:
    raise RestJaxError(f"bad gin config: {_first_line(e)}. Check the spelling of the binding "
                       "against the dataclasses in rest_jax/config.py and the gin files "
                       "under gin/.") from e
  try:
    run_config = gin.get_configurable(config_lib.RunConfig)()
  except RestJaxError:
    raise
  except (TypeError, ValueError) as e:
    raise RestJaxError(f"bad gin config: {_first_line(e)}.") from e
  return run_config, gin.config_str()


def _first_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:600]


def _run(args: argparse.Namespace, bindings: list[str]) -> None:
  from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  if not args.gin_file:
    raise RestJaxError("no --gin_file given; e.g. --gin_file "
                       "gin/experiments/numbers_de_en_cpu.gin.")
  settings = distributed.settings_from(vars(args))
  config, text = parse_run_config(args.gin_file, bindings)
  # Before anything touches a jax backend.
  distributed.initialize(settings)
  if not distributed.is_host0():  # Logs come from host 0; other hosts report only problems.
    logging.getLogger("rest_jax").setLevel(logging.WARNING)
  from rest_jax.pipeline import run as pipeline  # pylint: disable=g-import-not-at-top
  with distributed.collective_errors():
    pipeline.run(config, args.workdir, config_text=text, progress=not args.no_progress)


def _compile_check(args: argparse.Namespace, bindings: list[str]) -> None:
  if not args.gin_file:
    raise RestJaxError("no --gin_file given; e.g. --gin_file gin/experiments/smoke_cpu.gin.")
  from rest_jax.parallel import topology  # pylint: disable=g-import-not-at-top

  needed = topology.needed_cpu_devices(args.topology)
  if needed and "jax" not in sys.modules:  # GPU meshes compile for as many CPU devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={needed}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compiles for the topology, runs nothing.
  from rest_jax.pipeline import compile_check  # pylint: disable=g-import-not-at-top
  config, _ = parse_run_config(args.gin_file, bindings)
  for name in args.topology:
    print(compile_check.format_result(compile_check.check(config, name)), flush=True)


def _sweep(args: argparse.Namespace, bindings: list[str]) -> None:
  from rest_jax.cli import launchers  # pylint: disable=g-import-not-at-top
  from rest_jax.cli import sweep  # pylint: disable=g-import-not-at-top

  if not args.gin_file:
    raise RestJaxError("no --gin_file given; e.g. --gin_file gin/experiments/smoke_cpu.gin.")
  overrides = [b.replace(" = ", "=", 1) for b in bindings]
  axes = sweep.with_seeds([sweep.parse_axis(a) for a in args.sweep], args.seeds)
  runs = sweep.plan(args.root, args.gin_file, overrides, axes)
  opts = launchers.parse_options(args.launcher, args.launcher_args)
  if not args.dry_run:
    sweep.write_manifest(args.root, runs)
  sweep.run_sweep(runs, launcher=args.launcher, opts=opts, dry_run=args.dry_run)


def _compare(args: argparse.Namespace) -> None:
  from rest_jax.cli import compare  # pylint: disable=g-import-not-at-top

  workdirs = compare.resolve_workdirs(args.workdirs)
  summaries = compare.load_summaries(workdirs)
  print(compare.format_comparison(summaries))
  groups = compare.seed_groups(workdirs)
  if any(len(labels) > 1 for labels in groups.values()):
    print()
    print(compare.format_seed_statistics(compare.seed_statistics(summaries, groups)))
  if args.out:
    print(f"wrote {compare.plot_comparison(summaries, args.out, groups)}")


def _inspect(args: argparse.Namespace) -> None:
  from rest_jax.cli import inspection  # pylint: disable=g-import-not-at-top

  print(inspection.describe(args.workdir, num_examples=args.num_examples))
  if args.jsonl:
    n = inspection.export_jsonl(args.workdir, args.jsonl)
    print(f"wrote {n} records to {args.jsonl}")


def _best_of_n(args: argparse.Namespace) -> None:
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  from rest_jax.cli import bestofn  # pylint: disable=g-import-not-at-top

  ns = bestofn.parse_ns(args.n)
  results = [bestofn.run_best_of_n(args.workdir, phase=phase.strip(), ns=ns,
                                   num_examples=args.num_examples,
                                   temperature=args.temperature, seed=args.seed)
             for phase in args.phase.split(",") if phase.strip()]
  print(bestofn.format_best_of_n(results))
  if args.output:
    storage.write_json(args.output, results)
    print(f"wrote {args.output}")


def _quiet_gin_search(record: logging.LogRecord) -> bool:
  """Drops gin's log lines about include paths it tried before finding the file."""
  message = str(record.msg)
  return not (record.module in ("resource_reader", "config") and
              ("Path not found" in message or "system_path_file_exists" in message))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="rest-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run or resume a ReST experiment")
  run.add_argument("--workdir", required=True, help="experiment directory (resumable)")
  run.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  run.add_argument("--no_progress", action="store_true", help="hide progress bars")
  run.add_argument("--log_level", default="INFO")
  cc = sub.add_parser("compile-check", help="compile Grow and Improve steps for a TPU/GPU "
                      "topology ahead of time and print per-device memory against HBM")
  cc.add_argument("--topology", action="append", required=True,
                  help="e.g. v5e:16x16, v4:2x2x2, v5p:4x4x4, h100:4x8 (repeatable)")
  cc.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  cc.add_argument("--log_level", default="WARNING")
  sw = sub.add_parser("sweep", help="one run per combination of swept gin bindings")
  sw.add_argument("--root", required=True, help="sweep directory; run i goes to ROOT/<name>")
  sw.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  sw.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                  help="a gin binding and its values (repeatable; cartesian product)")
  sw.add_argument("--seeds", default=None, metavar="K",
                  help="also sweep config.RunConfig.seed over 0..K-1 (runs named ...,seed=N)")
  sw.add_argument("--launcher", default="local", choices=("local", "tpu", "xpk", "slurm"))
  sw.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                  help="print the launcher commands, run nothing")
  sw.add_argument("launcher_args", nargs="*", help="after --: the launcher's options")
  sw.add_argument("--log_level", default="WARNING")
  cmp = sub.add_parser("compare", help="table + plot of several runs' summary.json (mean and "
                       "95%% interval across runs that differ only by seed)")
  cmp.add_argument("workdirs", nargs="+", help="run workdirs, or sweep roots")
  cmp.add_argument("--out", default="", help="write the comparison plot (PNG) here")
  cmp.add_argument("--log_level", default="WARNING")
  multi = run.add_argument_group(
      "multi-host", "run the same command on every host; without these (or the REST_JAX_* "
      "environment variables) a TPU VM / SLURM cluster is detected, else one process runs")
  multi.add_argument("--coordinator_address", default=None, help="host 0's HOST:PORT "
                     "(env REST_JAX_COORDINATOR)")
  multi.add_argument("--num_processes", type=int, default=None,
                     help="number of processes (env REST_JAX_NUM_PROCESSES)")
  multi.add_argument("--process_id", type=int, default=None,
                     help="this process, 0..num_processes-1 (env REST_JAX_PROCESS_ID)")
  multi.add_argument("--heartbeat_timeout_s", type=int, default=None,
                     help="declare a silent host dead after this long (default 100; env "
                     "REST_JAX_HEARTBEAT_TIMEOUT_S)")
  multi.add_argument("--barrier_timeout_s", type=float, default=None,
                     help="longest wait for the other hosts at a barrier (default 1800)")
  ins = sub.add_parser("inspect", help="print Grow datasets' stats and examples")
  ins.add_argument("workdir")
  ins.add_argument("--num_examples", type=int, default=3)
  ins.add_argument("--jsonl", default=None, help="also export every record to this JSONL file")
  ins.add_argument("--log_level", default="WARNING")
  from rest_jax.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  convert_cli.add_parsers(sub)
  bon = sub.add_parser("best-of-n", help="best-of-N reward of saved policies on D_eval")
  bon.add_argument("--workdir", required=True, help="a `rest-jax run` workdir (read only)")
  bon.add_argument("--phase", default="bc,final",
                   help="comma-separated phases: bc, final, or gG_iI (e.g. g2_i2)")
  bon.add_argument("--n", default="1,2,4,8,16", help="comma-separated N values")
  bon.add_argument("--num_examples", type=int, default=0,
                   help="D_eval prompts (0: EvalConfig.num_examples of the run)")
  bon.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the run's Grow temperature)")
  bon.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's)")
  bon.add_argument("--output", default=None, help="also write the results as JSON here")
  bon.add_argument("--log_level", default="WARNING")
  from rest_jax.cli import rewards as reward_commands  # pylint: disable=g-import-not-at-top
  reward_commands.add_parsers(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the process exit code (2 for user errors, printed without traceback)."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, bindings = _split_gin_flags(argv)
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
      handler.addFilter(_quiet_gin_search)
    if bindings and args.command not in ("run", "compile-check", "sweep"):
      raise RestJaxError("--gin.X=V flags are only for `rest-jax run|compile-check|sweep`.")
    if args.command == "run":
      _run(args, bindings)
    elif args.command in ("import", "export"):
      from rest_jax.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
      (convert_cli.run_import if args.command == "import" else convert_cli.run_export)(args)
    elif args.command == "best-of-n":
      _best_of_n(args)
    elif args.command == "compile-check":
      _compile_check(args, bindings)
    elif args.command == "sweep":
      _sweep(args, bindings)
    elif args.command == "compare":
      _compare(args)
    elif args.command in ("train-reward", "serve-reward"):
      from rest_jax.cli import rewards as reward_commands  # pylint: disable=g-import-not-at-top
      (reward_commands.train_reward if args.command == "train-reward"
       else reward_commands.serve_reward)(args)
    else:
      _inspect(args)
  except RestJaxError as e:
    print(f"rest-jax: error: {e}", file=sys.stderr)
    if "jax" in sys.modules:  # A multi-host run ends now, not after waiting for dead hosts.
      from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
      distributed.exit_now_if_multihost(2)
    return 2
  except KeyboardInterrupt:
    print("rest-jax: interrupted; rerun the same command to resume.", file=sys.stderr)
    return 130
  return 0


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
