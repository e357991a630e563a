"""The `rest-jax` command line: flags, gin parsing, one call into the library.

  rest-jax run --workdir W --gin_file F [--gin_file F2 ...] [--gin.X=V ...]
  rest-jax inspect W [--num_examples K] [--jsonl PATH]
  rest-jax import --from hf|t5x|orbax|auto SRC --to ORBAX_DIR [--preset P | --config JSON]
  rest-jax export --from CHECKPOINT --to hf|t5x|orbax OUT [--preset P | --config JSON]
  rest-jax best-of-n W --phase bc,final [--n 1,2,4,8,16] [--output F.json]
  rest-jax compile-check --topology v5e:16x16 --gin_file F [--gin.X=V ...]
  rest-jax sweep --root R --gin_file F --sweep X=V1,V2 [...] [--seeds K] [--share_grow]
                 [--launcher L --dry-run -- OPTS]
  rest-jax compare W1 W2 ... [--out compare.png]
  rest-jax train-reward --data W_OR_JSONL --output_dir DIR   (see rest_jax/cli/rewards.py)
  rest-jax serve-reward --reward chrf --port P [--token_env VAR]
  rest-jax rescore W --reward R [--name N] [--reward_range LO,HI]

This is the only module that imports gin. Gin files bind the frozen dataclasses of
``rest_jax.config`` (with ``from __gin__ import dynamic_registration``); rerunning the same
``run`` command resumes the experiment in its workdir.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rest_jax import storage_errors  # pylint: disable=g-import-not-at-top
from rest_jax.cli import parser, quiet  # pylint: disable=g-import-not-at-top
from rest_jax.errors import (  # pylint: disable=g-import-not-at-top
    EXIT_PREEMPTED, Preempted, RestJaxError)

# Before anything imports TensorFlow.
quiet.set_quiet_env(not any(a.upper() in ("DEBUG", "--LOG_LEVEL=DEBUG") for a in sys.argv))

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


def _tolerate_namespace_packages(gin) -> None:
  """Makes gin's package-path reader skip folders that are not packages.

  gin tries an include such as 'runs/base.gin' as a file of the Python package ``runs``; a
  plain ``runs/`` folder in the current directory (a namespace package) made it crash.
  """
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "__name__", "") == "system_path_file_exists":
      def tolerant(path: str, exists=exists) -> bool:
        try:
          return exists(path)
        except TypeError:  # spec.origin is None: a folder, not a package.
          return False
      tolerant.__name__ = "tolerant_system_path_file_exists"
      readers[i] = (reader, tolerant)
  del gin


_GIN_ERRORS = (ValueError, KeyError, NameError, SyntaxError, ImportError, TypeError)
_LITERAL_START = tuple("0123456789-+.[({'\"@%") + ("True", "False", "None")


def binding_error(binding: str, e: BaseException) -> RestJaxError:
  """A one-line error for a ``--gin.NAME=VALUE`` binding gin could not parse or apply."""
  name, _, value = (part.strip() for part in binding.partition("="))
  cause = one_line(str(e))
  unreadable = any(w in cause for w in ("Unable to parse", "Failed to parse", "malformed node",
                                        "EOL", "unterminated", "invalid syntax"))
  if unreadable:
    text = value.strip("'\"")
    fix = (f"strings need quotes inside the shell's: --gin.{name}=\"'{text}'\""
           if not value.startswith(_LITERAL_START) or value[:1] in "'\""
           else "write a Python literal (number, True/False, 'string', [list])")
    return RestJaxError(f"--gin.{name}={value}: gin cannot read the value {value}; {fix}.")
  return RestJaxError(f"--gin.{name}={value}: {cause}; check the name against the dataclasses "
                      "in rest_jax/config/ (e.g. config.RunConfig.seed, "
                      "bc/config.TrainConfig.num_steps) or the macros of your gin files.")


_URL_READER: list[bool] = []  # Whether gin reads URLs through rest_jax.storage yet.


def parse_run_config(gin_files: list[str], bindings: list[str]):
  """Parses gin files and bindings into a RunConfig; returns (config, operative config text).

  Raises:
    RestJaxError: a missing file, or a file or binding gin cannot parse (the error names the
      binding and how to fix it), or a config the dataclasses refuse.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from rest_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from rest_jax import storage  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  _tolerate_namespace_packages(gin)
  for path in (os.getcwd(), REPO_GIN_DIR):
    gin.add_config_file_search_path(path)
  if any(not storage.is_local(p) for p in gin_files) and not _URL_READER:
    # A gin file on gs:// (e.g. the model.gin of `rest-jax import --to gs://...`).
    gin.config.register_file_reader(lambda p: storage.open_read(p, "r"),
                                    lambda p: not storage.is_local(p) and storage.exists(p))
    _URL_READER.append(True)
  for path in gin_files:
    if not storage.exists(path) and not os.path.exists(os.path.join(REPO_GIN_DIR, path)):
      raise RestJaxError(f"gin file {path!r} does not exist; pass a path to a .gin file "
                         f"(the shipped ones are under {REPO_GIN_DIR}).")
  try:
    gin.parse_config_files_and_bindings(gin_files, [], finalize_config=False)
  except _GIN_ERRORS as e:
    raise RestJaxError(f"bad gin config: {one_line(str(e))}; check the spelling against the "
                       "dataclasses in rest_jax/config/ and the gin files under gin/.") from e
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except _GIN_ERRORS as e:
      raise binding_error(binding, e) from e
  try:
    run_config = gin.get_configurable(config_lib.RunConfig)()
  except RestJaxError as e:
    raise RestJaxError(one_line(str(e))) from e
  except (TypeError, ValueError) as e:
    raise RestJaxError(f"bad gin config: {one_line(str(e))}.") from e
  return run_config, gin.config_str()


def one_line(message: str) -> str:
  """``message`` as one line: gin's context lines ("In call to configurable 'X'", "In file F,
  line N" and the statement under it) are folded into a short suffix."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if not lines:
    return ""
  head, where, skip_next = [lines[0]], [], False
  for line in lines[1:]:
    if skip_next:
      skip_next = False
    elif line.startswith("In call to configurable"):
      name = line.split("'")[1] if line.count("'") >= 2 else line
      where.append(f"in {name}")
    elif line.startswith(("In file", "In bindings string")):
      where.append(line[3:].replace('"', ""))
      skip_next = True
    else:
      head.append(line)
  text = " ".join(" ".join(head).split())[:600]
  return f"{text} ({'; '.join(dict.fromkeys(where))})" if where else text


def _run(args: argparse.Namespace, bindings: list[str]) -> None:
  from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  if not args.gin_file:
    raise RestJaxError("no --gin_file given; e.g. --gin_file "
                       "gin/experiments/numbers_de_en_cpu.gin.")
  settings = distributed.settings_from(vars(args))
  config, text = parse_run_config(args.gin_file, bindings)
  # Before anything touches a jax backend.
  distributed.initialize(settings)
  quiet.start_quietly(quiet=args.log_level != "DEBUG", jax_backend=True)
  if not distributed.is_host0():  # Logs come from host 0; other hosts report only problems.
    logging.getLogger("rest_jax").setLevel(logging.WARNING)
  from rest_jax.pipeline import run as pipeline  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline import reporting  # pylint: disable=g-import-not-at-top
  with distributed.collective_errors():
    result = pipeline.run(config, args.workdir, config_text=text, progress=not args.no_progress)
  if distributed.is_host0():  # Results on stdout; logs went to stderr.
    print(reporting.format_result(result, args.workdir), flush=True)


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
  sweep.run_sweep(runs, launcher=args.launcher, opts=opts, dry_run=args.dry_run,
                  share_grow=args.share_grow)


def _compare(args: argparse.Namespace) -> None:
  from rest_jax.cli import compare, compare_cost  # pylint: disable=g-import-not-at-top

  workdirs = compare.resolve_workdirs(args.workdirs)
  summaries = compare.load_summaries(workdirs)
  print(compare.format_comparison(summaries))
  groups = compare.seed_groups(workdirs)
  if any(len(labels) > 1 for labels in groups.values()):
    print()
    print(compare.format_seed_statistics(compare.seed_statistics(summaries, groups)))
  if compare_cost.has_extras(summaries):
    print()
    print(compare_cost.format_cost_table(summaries))
  if args.out:
    print(f"wrote {compare.plot_comparison(summaries, args.out, groups)}")
    cost_plot = compare_cost.plot_cost(summaries, args.out)
    if cost_plot:
      print(f"wrote {cost_plot}")


def _inspect(args: argparse.Namespace) -> None:
  from rest_jax.cli import inspection  # pylint: disable=g-import-not-at-top

  print(inspection.describe(args.workdir, num_examples=args.num_examples))
  if args.jsonl:
    n = inspection.export_jsonl(args.workdir, args.jsonl)
    print(f"wrote {n} records to {args.jsonl}")


def _best_of_n(args: argparse.Namespace) -> None:
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  from rest_jax.cli import bestofn  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or args.workdir_flag
  if not workdir:
    raise RestJaxError("best-of-n needs a workdir: rest-jax best-of-n WORKDIR [--phase ...].")
  quiet.start_quietly(quiet=args.log_level != "DEBUG", jax_backend=True)
  ns = bestofn.parse_ns(args.n)
  results = [bestofn.run_best_of_n(workdir, phase=phase.strip(), ns=ns,
                                   num_examples=args.num_examples,
                                   temperature=args.temperature, seed=args.seed)
             for phase in args.phase.split(",") if phase.strip()]
  print(bestofn.format_best_of_n(results))
  if args.output:
    storage.write_json(args.output, results)
    print(f"wrote {args.output}")


def _rescore(args: argparse.Namespace) -> None:
  import dataclasses  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  try:
    lo, hi = (float(v) for v in args.reward_range.split(","))
  except ValueError:
    raise RestJaxError(f"--reward_range {args.reward_range!r} must be two numbers LO,HI, e.g. "
                       "--reward_range 0,1.") from None
  settings = distributed.settings_from(vars(args))
  distributed.initialize(settings)
  quiet.start_quietly(quiet=args.log_level != "DEBUG", jax_backend=True)
  import jax  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline import rescore  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline.workdir import Workdir  # pylint: disable=g-import-not-at-top
  wd = Workdir(args.workdir)
  wd.require_exists()
  config = dataclasses.replace(wd.load_run_config().reward_config, range=(lo, hi))
  with distributed.collective_errors():
    result = rescore.rescore_workdir(
        args.workdir, spec=args.reward, name=args.name, reward_config=config,
        host_id=jax.process_index(), num_hosts=jax.process_count(),
        barrier=distributed.barrier, batch_size=args.batch_size)
  if distributed.is_host0():
    for folder, entry in result["grow_sets"].items():
      s = entry["stats"]
      print(f"{folder}: reward version {result['version']} ({entry['reward']}): "
            f"{entry['records']} records, mean sample reward {s['mean']:.4f}", flush=True)


def _quiet_gin_search(record: logging.LogRecord) -> bool:
  """Drops gin's log lines about include paths it tried before finding the file."""
  message = str(record.msg)
  return not (record.module in ("resource_reader", "config") and
              ("Path not found" in message or "system_path_file_exists" in message))


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the process exit code: 0, 2 for user errors (printed without
  traceback), 75 when SIGTERM stopped ``run`` cleanly (rerun to resume), 130 on Ctrl-C."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, bindings = _split_gin_flags(argv)
    args = parser.build_parser().parse_args(rest)
    args.log_level = args.log_level.upper()
    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.log_level != "DEBUG":
      for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in ("import", "export", "compile-check", "train-reward", "serve-reward",
                        "inspect"):  # They import TensorFlow; run and best-of-n do below.
      quiet.start_quietly(quiet=args.log_level != "DEBUG", jax_backend=False)
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
    elif args.command == "rescore":
      _rescore(args)
    elif args.command in ("train-reward", "serve-reward"):
      from rest_jax.cli import rewards as reward_commands  # pylint: disable=g-import-not-at-top
      (reward_commands.train_reward if args.command == "train-reward"
       else reward_commands.serve_reward)(args)
    else:
      _inspect(args)
  except KeyboardInterrupt:
    print("rest-jax: interrupted; rerun the same command to resume.", file=sys.stderr)
    return 130
  except Preempted as e:  # SIGTERM: every host saved and stopped at the same point.
    print(f"rest-jax: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  except Exception as e:  # pylint: disable=broad-except
    # A user error, or a storage failure that escaped the storage layer; anything else raises.
    error = e if isinstance(e, RestJaxError) else storage_errors.uncaught(e)
    if error is None:
      raise
    print(f"rest-jax: error: {one_line(str(error))}", file=sys.stderr)
    if "jax" in sys.modules:  # A multi-host run ends now, not after waiting for dead hosts.
      from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
      distributed.exit_now_if_multihost(2)
    return 2
  return 0


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
