"""Real multi-process runs on localhost (gloo CPU collectives).

One reference run (1 process x 4 CPU devices) and one 2-process run (2 processes x 2 devices,
DCN data axis over the processes) of the same tiny config, scored by a tiny learned reward model
(``learned:``: each host scores its own samples on a mesh of its own devices). The 2-process run
is killed (process 1, SIGKILL) right after BC: process 0 must stop with an error on its own, and
rerunning the same command on both processes resumes to the reference's Grow records and eval
rewards, and final parameters equal within float tolerance (numbers: docs/multihost.md,
"Determinism"). A slow test runs the 2 processes with a ``remote:`` reward; uneven per-host
rows: test_multihost_rewards.py.
A slow test sends SIGTERM to both processes during Grow and again during Improve: both stop at
the same point with exit 75, and the rerun ends as the uninterrupted runs do.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from rest_jax import storage
from rest_jax.grow import dataset as growdata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The CLI, after registering a tiny task (32 prompts, 8 held out, short numbers).
WRAPPER = """
import sys
from rest_jax import tasks
from rest_jax.tasks import numbers
tasks.register(numbers.make_numbers_task("mh_numbers", num_train=32, num_eval=8, max_number=99,
                                         seed=3))
from rest_jax.cli import main
sys.exit(main.main(sys.argv[1:]))
"""

ARGS = [
    "--gin_file", os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin"), "--no_progress",
    "--gin.config.RunConfig.task='mh_numbers'", "--gin.config.RunConfig.input_len=20",
    "--gin.config.RunConfig.target_len=16", "--gin.config.RunConfig.num_grow_steps=1",
    "--gin.config.RunConfig.num_improve_steps=1",
    "--gin.bc/config.TrainConfig.num_steps=2", "--gin.bc/config.TrainConfig.eval_every=2",
    "--gin.bc/config.TrainConfig.batch_size=8",
    "--gin.improve/config.TrainConfig.num_steps=2",
    "--gin.improve/config.TrainConfig.eval_every=2",
    "--gin.improve/config.TrainConfig.batch_size=8",
    "--gin.config.SamplingConfig.batch_size=8", "--gin.config.SamplingConfig.max_decode_len=16",
    "--gin.config.GrowConfig.chunk_size=8",
    "--gin.config.EvalConfig.num_examples=8", "--gin.config.EvalConfig.batch_size=8",
    "--gin.config.EvalConfig.max_decode_len=16",
    "--gin.config.RewardConfig.batch_size=16", "--gin.config.RewardConfig.request_batch_size=8",
]
# A learned reward on another mesh (1 process: 4 devices; 2 processes: each host its own 2)
# sums in another order: measured max |difference| 4.8e-7 (Grow records of the runs below; eval
# rewards 0) and 2.4e-7 (test_multihost_rewards.py); the other rewards are exact.
REWARD_ATOL = 2e-6


def _env(num_devices: int) -> dict:
  env = dict(os.environ)
  # XLA's default optimisation level, as in production (conftest.py sets level 0 for the rest of
  # the suite): the equality claims below are measured at it.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count",
                                "--xla_backend_optimization_level"))]
  env.update(XLA_FLAGS=" ".join(flags), JAX_NUM_CPU_DEVICES=str(num_devices),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, num_processes: int, num_devices: int, extra=(),
            logs: str | None = None, reward: str | None = None) -> list[subprocess.Popen]:
  """Starts ``rest-jax run`` once per process; stdout+stderr go to LOGS.p{i}.log (default
  WORKDIR.p{i}.log). ``reward``: the reward spec (the runs below pass their learned one)."""
  argv = [sys.executable, "-c", WRAPPER, "run", "--workdir", str(workdir)] + ARGS + list(extra)
  if reward:
    argv.append(f"--gin.config.RunConfig.reward='{reward}'")
  port = _free_port()
  procs = []
  for i in range(num_processes):
    dist = ([] if num_processes == 1 else
            ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
             str(num_processes), "--process_id", str(i), "--heartbeat_timeout_s", "15",
             "--barrier_timeout_s", "900", "--gin.config.MeshConfig.dcn_data=2"])
    log = open(f"{logs or workdir}.p{i}.log", "a", encoding="utf-8")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(argv + dist, env=_env(num_devices), stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO))
  return procs


def _wait(procs, timeout=1800) -> list[int]:
  """Exit codes; a process still running after ``timeout`` (a hang) is killed and fails."""
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _tail(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [l for l in f.read().splitlines()
             if l.strip() and not l.startswith("    @") and not l.startswith("[Gloo]")]
  return "\n".join(lines[-8:])


def _launch_until_bc(multi, reward: str | None = None) -> list:
  """Starts the 2-process run in ``multi``; returns its processes once BC has finished."""
  procs = _launch(multi, 2, 2, reward=reward)
  marker = multi / "phases" / "bc.json"
  deadline = time.time() + 1800
  while not marker.exists() and all(p.poll() is None for p in procs):
    assert time.time() < deadline, "BC did not finish"
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), _tail(f"{multi}.p0.log")
  return procs


@pytest.fixture(scope="module")
def learned(reward_model) -> str:
  """The runs' reward spec."""
  return f"learned:{reward_model}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, learned) -> str:  # pylint: disable=redefined-outer-name
  """The workdir of the 1-process run (4 devices), on local disk."""
  ref = tmp_path_factory.mktemp("multihost_ref") / "ref"
  codes = _wait(_launch(ref, 1, 4, reward=learned))
  assert codes == [0], _tail(f"{ref}.p0.log")
  return str(ref)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference, learned):  # pylint: disable=redefined-outer-name
  base = tmp_path_factory.mktemp("multihost")
  ref, multi = reference, base / "multi"

  procs = _launch_until_bc(multi, learned)
  killed_at = time.time()
  procs[1].send_signal(signal.SIGKILL)
  survivor_code = _wait(procs[:1], timeout=300)[0]  # A hang fails here, not blocks forever.
  time_to_error = time.time() - killed_at
  procs[1].wait()
  survivor_log = _tail(f"{multi}.p0.log")

  codes = _wait(_launch(multi, 2, 2, reward=learned))  # The same command again: resumes.
  assert codes == [0, 0], _tail(f"{multi}.p0.log") + _tail(f"{multi}.p1.log")
  print(f"\nkilled process 1 after BC; process 0 exited with {survivor_code} after "
        f"{time_to_error:.1f} s:\n{survivor_log}")
  return dict(ref=str(ref), multi=str(multi), survivor_code=survivor_code,
              survivor_log=survivor_log, time_to_error=time_to_error)


def _records(workdir):
  out = {}
  for r in growdata.read_records(storage.join(workdir, "grow", "g001")):
    out[(r.example_id, r.sample_idx)] = r
  return out


def _params(workdir, phase):
  best = storage.join(workdir, "checkpoints", phase, "best")
  (step,) = [n for n in storage.listdir(best) if n.isdigit()]
  path = epath.Path(storage.join(best, step, "params"))
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=restore_args))
  return dict(jax.tree_util.tree_flatten_with_path(restored)[0])


def _eval_rewards(workdir):
  """Per summary row: (phase, eval reward, exact match, the monitor's independent metric)."""
  rows = storage.read_json(storage.join(workdir, "summary.json"))["rows"]
  return [(r["phase"], r["eval_reward"], r["eval_exact_match"], r.get("eval_independent"))
          for r in rows]


def _assert_equal_evals(ref_dir: str, other_dir: str) -> None:
  """The same phases and exact match (and independent metric: BLEU of the same decodes); eval
  rewards within REWARD_ATOL."""
  ref, other = _eval_rewards(ref_dir), _eval_rewards(other_dir)
  assert [(p, m, i) for p, _, m, i in other] == [(p, m, i) for p, _, m, i in ref]
  assert all(i is not None for *_, i in ref)  # The reward-hacking monitor ran (BLEU).
  diff = max(abs(a[1] - b[1]) for a, b in zip(ref, other))
  print(f"eval rows: {len(ref)}, max |eval reward diff| {diff:.3g}")
  assert diff <= REWARD_ATOL


def test_killed_host_stops_the_others_with_an_error(runs):
  # Either a collective or a barrier with the dead host fails (our error, exit 2) or, if the
  # survivor was not talking to it, jax.distributed's heartbeat check ends it (SIGABRT).
  log = runs["survivor_log"]
  if runs["survivor_code"] == 2:
    assert ("rest-jax: error: a computation across the 2 processes failed" in log or
            "not every one of the 2 processes arrived" in log), log
    # The message's tail can be cut: jax's heartbeat check may abort the process while it
    # prints (seen once in CI: "... rerun the same command on every host to re").
    assert "rerun the same command on every host" in log, log
  else:
    assert runs["survivor_code"] == -signal.SIGABRT, log
    assert "JAX distributed service detected fatal errors" in log, log


def _assert_reference_records(ref_dir: str, multi_dir: str) -> None:
  ref, multi = _records(ref_dir), _records(multi_dir)
  assert len(ref) == 32 * 3  # 32 prompts x (2 samples + the original pair).
  assert sorted(ref) == sorted(multi)
  for key, r in ref.items():
    m = multi[key]
    assert list(r.targets) == list(m.targets), key
    # Targets bit-identical; log-probs within 1e-5 (measured max 1.9e-6 at XLA's default
    # level: the 2-process mesh sums in another order), learned rewards within REWARD_ATOL.
    np.testing.assert_allclose(r.behaviour_logprobs, m.behaviour_logprobs, atol=1e-5, rtol=0)
    assert abs(r.reward - m.reward) <= REWARD_ATOL, key
  diff = max(float(np.max(np.abs(r.behaviour_logprobs - multi[k].behaviour_logprobs)))
             for k, r in ref.items())
  rewards = np.asarray([r.reward for r in ref.values()])
  reward_diff = max(abs(r.reward - multi[k].reward) for k, r in ref.items())
  assert rewards.std() > 0.05  # The learned reward spreads over (0, 1): rows are read.
  print(f"grow records: {len(ref)} equal, max |behaviour logprob diff| {diff:.3g}, max |reward "
        f"diff| {reward_diff:.3g} (rewards {rewards.min():.3g}..{rewards.max():.3g})")
  files = growdata.chunk_files(storage.join(multi_dir, "grow", "g001"))
  assert {f[:len("chunk-h000")] for f in files} == {"chunk-h000", "chunk-h001"}
  assert len(files) == 4  # 16 prompts per host, 8 per chunk.


def _assert_reference_evals_and_params(ref_dir: str, multi_dir: str) -> None:
  _assert_equal_evals(ref_dir, multi_dir)
  for phase in ("bc", "g001_i01"):
    ref, multi = _params(ref_dir, phase), _params(multi_dir, phase)
    assert ref.keys() == multi.keys() and len(ref) > 10
    diff = max(float(np.max(np.abs(ref[k] - multi[k]))) for k in ref)
    print(f"{phase}: {len(ref)} arrays, max |param diff| {diff:.3g}")
    # Measured at XLA's default level with the production optimizer: 9.1e-7 after BC, 3.8e-6
    # after Improve (level 0: 3.9e-7, 8.2e-7); tolerance 1e-5.
    assert diff < 1e-5, phase


def test_two_processes_write_the_reference_grow_records(runs):
  _assert_reference_records(runs["ref"], runs["multi"])


def test_two_processes_end_with_the_reference_evals_and_params(runs):
  _assert_reference_evals_and_params(runs["ref"], runs["multi"])


@pytest.mark.slow
def test_two_processes_with_the_workdir_on_gcs_equal_the_local_run(reference, learned, gcs_root,
                                                                   tmp_path):
  # The workdir on the GCS emulator, no local folder shared by the processes (only their logs
  # are local, for the test): the same records, evals and params as the 1-process local run.
  multi = gcs_root + "/multi"
  started = time.time()
  codes = _wait(_launch(multi, 2, 2, logs=str(tmp_path / "multi"), reward=learned))
  assert codes == [0, 0], _tail(f"{tmp_path}/multi.p0.log") + _tail(f"{tmp_path}/multi.p1.log")
  print(f"\n2 processes, workdir {multi} on the emulator: {time.time() - started:.0f} s")
  _assert_reference_records(reference, multi)
  _assert_reference_evals_and_params(reference, multi)


@pytest.mark.slow
def test_killed_coordinator_stops_the_other_host_in_bounded_time(tmp_path):
  # Host 0 runs the coordination service: killing it leaves process 1 with no one to talk to.
  # It must not hang: a collective or barrier fails (our error, exit 2) or the heartbeat to the
  # coordinator fails (jax.distributed ends it, SIGABRT). Measured: exit 2 after 0.2 s (a Gloo
  # all-gather saw the connection reset); the bound, 120 s, is generous beyond the 15 s heartbeat.
  # 42 s in all on 2 shared cores, hence slow.
  multi = tmp_path / "multi"
  procs = _launch_until_bc(multi)
  killed_at = time.time()
  procs[0].send_signal(signal.SIGKILL)
  code = _wait(procs[1:], timeout=300)[0]  # A hang fails here, not blocks forever.
  time_to_error = time.time() - killed_at
  procs[0].wait()
  log = _tail(f"{multi}.p1.log")
  print(f"\nkilled process 0 (the coordinator) after BC; process 1 exited with {code} after "
        f"{time_to_error:.1f} s:\n{log}")
  if code == 2:
    assert ("rest-jax: error: a computation across the 2 processes failed" in log or
            "not every one of the 2 processes arrived" in log), log
    # The message's tail can be cut: jax's heartbeat check may abort the process while it
    # prints (seen once in CI: "... rerun the same command on every host to re").
    assert "rerun the same command on every host" in log, log
  else:
    assert code == -signal.SIGABRT, log
    assert "JAX distributed service detected fatal errors" in log or "coordination" in log, log
  assert time_to_error < 120, time_to_error


# A loaded machine (other jobs on the 2 cores) once stalled a process past the 15 s heartbeat
# before Grow; these runs wait longer for a silent peer.
_PATIENT = ("--heartbeat_timeout_s", "120")


def _log_size(workdir, i: int) -> int:
  path = f"{workdir}.p{i}.log"
  return os.path.getsize(path) if os.path.exists(path) else 0


def _log_since(workdir, i: int, offset: int) -> str:
  with open(f"{workdir}.p{i}.log", encoding="utf-8", errors="replace") as f:
    f.seek(offset)
    return f.read()


def _launch_until(workdir, pattern: str, reward: str) -> tuple[list, list[int]]:
  """Starts the 2-process run; returns its processes once process 0 has logged ``pattern``,
  and where each process's log started."""
  offsets = [_log_size(workdir, i) for i in range(2)]
  procs = _launch(workdir, 2, 2, _PATIENT, reward=reward)
  deadline = time.time() + 1800
  while all(p.poll() is None for p in procs):
    assert time.time() < deadline, f"{pattern!r} not reached"
    if pattern in _log_since(workdir, 0, offsets[0]):
      return procs, offsets
    time.sleep(0.05)
  raise AssertionError(f"ended before {pattern!r}:\n{_tail(f'{workdir}.p0.log')}\n"
                       f"{_tail(f'{workdir}.p1.log')}")


def _sigterm_both(launched, workdir) -> tuple[list[int], float, list[str]]:
  """SIGTERM to every process; (exit codes, seconds from the signal to the last exit, each
  process's preemption line)."""
  procs, offsets = launched
  sent = time.time()
  for p in procs:
    p.send_signal(signal.SIGTERM)
  codes = _wait(procs, timeout=600)
  seconds = time.time() - sent
  lines = []
  for i, offset in enumerate(offsets):
    text = _log_since(workdir, i, offset)
    found = [l for l in text.splitlines() if l.startswith("rest-jax: preempted")]
    lines.append(found[-1] if found else "\n".join(text.splitlines()[-8:]))
  return codes, seconds, lines


@pytest.mark.slow
def test_sigterm_in_grow_and_in_improve_then_rerun_equals_uninterrupted(runs, learned, tmp_path):
  # Both processes get SIGTERM (as on a TPU maintenance event or a SLURM preemption); jax's
  # preemption service makes them stop after the same step, they save and exit with 75.
  work = tmp_path / "preempted"
  codes, grow_s, grow_lines = _sigterm_both(_launch_until(work, "Grow g1: ", learned), work)
  assert codes == [75, 75], grow_lines
  for line in grow_lines:  # The first sampler batch compiles: far longer than the agreement.
    assert line.startswith("rest-jax: preempted (SIGTERM): grow g1 kept its complete chunks"), line
  assert line.endswith("Rerun the same command to resume. (exit code 75)")
  assert not growdata.is_complete(os.path.join(work, "grow", "g001"))

  codes, improve_s, improve_lines = _sigterm_both(_launch_until(work, "g001_i01 step 0:", learned), work)
  assert codes == [75, 75], improve_lines
  assert len(set(improve_lines)) == 1, improve_lines  # The same step on both hosts.
  assert "g001_i01 saved at step" in improve_lines[0], improve_lines
  assert not os.path.exists(os.path.join(work, "phases", "g001_i01.json"))

  codes = _wait(_launch(work, 2, 2, _PATIENT, reward=learned))
  assert codes == [0, 0], _tail(f"{work}.p0.log") + _tail(f"{work}.p1.log")
  print(f"\nSIGTERM in Grow: exit 75 on both after {grow_s:.1f} s ({grow_lines[0]}); in Improve: "
        f"after {improve_s:.1f} s ({improve_lines[0]})")
  # The same 2-process computation as the uninterrupted run (itself equal to the 1-process
  # reference, tested above), resumed mid-step: bit-identical.
  ref, got = _records(runs["multi"]), _records(str(work))
  assert sorted(ref) == sorted(got)
  for key, r in ref.items():
    assert list(r.targets) == list(got[key].targets) and r.reward == got[key].reward, key
    np.testing.assert_array_equal(r.behaviour_logprobs, got[key].behaviour_logprobs)
  assert _eval_rewards(str(work)) == _eval_rewards(runs["multi"])
  for phase in ("bc", "g001_i01"):
    a, b = _params(runs["multi"], phase), _params(str(work), phase)
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"{phase}: max |param diff| to the uninterrupted 2-process run {diff:.3g}")
    assert diff == 0.0, phase  # The same 2-process computation, resumed mid-phase.


@pytest.mark.slow
def test_two_processes_with_a_remote_reward_equal_the_reference(reference, reward_server,
                                                                 tmp_path):
  # Each host posts its own samples (and the eval decodes) to one reward server that serves the
  # reference's learned reward model (in this process): the same records, evals and params as
  # the 1-process run that scored with the model itself.
  multi = tmp_path / "remote"
  started = time.time()
  codes = _wait(_launch(multi, 2, 2, reward=f"remote:{reward_server}"))
  assert codes == [0, 0], _tail(f"{multi}.p0.log") + _tail(f"{multi}.p1.log")
  print(f"\n2 processes with reward remote:{reward_server}: {time.time() - started:.0f} s")
  _assert_reference_records(reference, str(multi))
  _assert_reference_evals_and_params(reference, str(multi))
