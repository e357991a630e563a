"""Test setup: 8 fake CPU devices, set before anything imports jax.

XLA compiles at backend optimisation level 0 here: the suite is compile-bound, and level 0 ran
test_improve, test_sampling, test_sharding and test_meshes in 52 s instead of 74 s at the
default level (2 CPU cores; the real-model sampling tests compile about 2x faster). The
equality tests behind the docs' determinism claims (marked ``default_xla``) must hold for what
production runs, so they run instead in one fresh pytest process at XLA's default level
(``REST_JAX_TEST_DEFAULT_XLA=1``; set it yourself to run any test file at the default level).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest

_ORIGINAL_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
DEFAULT_XLA = os.environ.get("REST_JAX_TEST_DEFAULT_XLA") == "1"
os.environ["XLA_FLAGS"] = (_ORIGINAL_XLA_FLAGS + " --xla_force_host_platform_device_count=8" +
                           ("" if DEFAULT_XLA else " --xla_backend_optimization_level=0")).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def mesh_layout(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None,
                rules: str = "2d"):
  """``meshes.layout_from_config(MeshConfig(data, fsdp, tensor, rules=rules), devices)``: the
  library's one way from mesh sizes to a Layout, spelled short for tests."""
  from rest_jax.config import MeshConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel.meshes import layout_from_config  # pylint: disable=g-import-not-at-top
  return layout_from_config(MeshConfig(data, fsdp, tensor, rules=rules), devices=devices)


def committed_files(workdir: str) -> list[str]:
  """Paths (relative to ``workdir``) of every committed file: temporaries, ours and orbax's,
  left out."""
  out = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if not d.endswith(".tmp") and "orbax-checkpoint-tmp" not in d]
    out += [os.path.relpath(os.path.join(root, n), workdir) for n in files
            if not n.endswith(".tmp")]
  return out


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A local GCS (tests/gcs_emulator.py), one per pytest(-xdist) process; its environment is
  set in ``os.environ`` for the whole session (TF's GCS file system reads it once) and in the
  environment of the processes the tests start."""
  import gcs_emulator as emulator  # pylint: disable=g-import-not-at-top
  running = emulator.start(str(tmp_path_factory.mktemp("gcs")))
  running.apply()
  yield running
  running.stop()


@pytest.fixture
def gcs_root(gcs_emulator, request):  # pylint: disable=redefined-outer-name
  """``gs://BUCKET``: a new, empty bucket on the emulator for this test."""
  name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
  return gcs_emulator.create_bucket(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory) -> str:
  """A tiny random reward-model directory (``multihost_reward_worker.make``), for ``learned:``."""
  import multihost_reward_worker  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp("reward_model") / "rm")
  multihost_reward_worker.make(directory)
  return directory


@pytest.fixture(scope="session")
def reward_server(reward_model):  # pylint: disable=redefined-outer-name
  """``http://127.0.0.1:PORT/score``: a reward server, in this process, serving ``reward_model``."""
  from rest_jax.config import RewardConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import build_reward, server  # pylint: disable=g-import-not-at-top
  running = server.make_server(build_reward(f"learned:{reward_model}", RewardConfig(batch_size=16)))
  threading.Thread(target=running.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{running.server_address[1]}/score"
  running.shutdown()
  running.server_close()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")
# The smoke experiment (2 Grow x 2 Improve) with fewer steps and a smaller eval set: the runs
# the crash, GCS and preemption tests kill and resume.
SMOKE_SHRINK = ["--gin.bc/config.TrainConfig.num_steps=10",
                "--gin.bc/config.TrainConfig.eval_every=5",
                "--gin.improve/config.TrainConfig.num_steps=6",
                "--gin.improve/config.TrainConfig.eval_every=3",
                "--gin.config.EvalConfig.num_examples=16", "--gin.config.GrowConfig.chunk_size=32"]


def start_smoke_run(workdir: str, log: str, bindings=tuple(SMOKE_SHRINK), *,
                    append: bool = True) -> subprocess.Popen:
  """``rest-jax run`` of the smoke experiment with ``bindings`` in a child process (this
  checkout's code), stdout and stderr to ``log``."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  with open(log, "ab" if append else "wb") as out:
    return subprocess.Popen(
        [sys.executable, "-m", "rest_jax.cli.main", "run", "--workdir", workdir, "--gin_file",
         SMOKE, "--no_progress", *bindings], stdout=out, stderr=subprocess.STDOUT, env=env,
        cwd=REPO)


def pytest_addoption(parser):
  parser.addoption("--run_slow", action="store_true", default=False,
                   help="also run tests marked slow (e.g. the README's full smoke run)")
  parser.addoption("--error_log", default=None, metavar="PATH",
                   help="append every RestJaxError raised in this process to PATH as JSON lines "
                   "{test, message} (docs/errors.md is built from it)")


def pytest_configure(config):
  if config.getoption("--error_log"):
    _log_user_errors(config.getoption("--error_log"))
  config.addinivalue_line("markers", "slow: long end-to-end test; runs only with --run_slow")
  config.addinivalue_line(
      "markers", "default_xla: an equality claim; runs in a fresh process at XLA's default "
      "optimisation level (see tests/conftest.py)")


def _log_user_errors(path: str) -> None:
  """Records each RestJaxError this process creates, with the test that was running."""
  from rest_jax import errors  # pylint: disable=import-outside-toplevel

  original = errors.RestJaxError.__init__

  def logged(self, *args, **kwargs):
    original(self, *args, **kwargs)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"test": test, "message": str(self)}) + "\n")

  errors.RestJaxError.__init__ = logged


@pytest.hookimpl(trylast=True)  # After -k / -m deselection.
def pytest_collection_modifyitems(config, items):
  if not (config.getoption("--run_slow") or os.environ.get("REST_JAX_RUN_SLOW") == "1"):
    skip = pytest.mark.skip(reason="slow: run with --run_slow (or REST_JAX_RUN_SLOW=1)")
    for item in items:
      if item.get_closest_marker("slow") is not None:  # Not keywords: a param id may be "slow".
        item.add_marker(skip)
  if DEFAULT_XLA:
    return
  runner = _DefaultXlaRunner(str(config.rootpath))
  for i, item in enumerate(items):
    if item.get_closest_marker("default_xla") and not item.get_closest_marker("skip"):
      items[i] = DefaultXlaItem.from_parent(item.parent, name=item.name, runner=runner)
      runner.nodeids.append(items[i].nodeid)


class _DefaultXlaRunner:
  """Runs all ``default_xla`` tests of this session in one child pytest (on first need)."""

  def __init__(self, rootdir: str):
    self.rootdir, self.nodeids, self.results, self.output = rootdir, [], None, ""

  def result(self, nodeid: str) -> dict:
    if self.results is None:
      with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        env = dict(os.environ, XLA_FLAGS=_ORIGINAL_XLA_FLAGS, REST_JAX_TEST_DEFAULT_XLA="1",
                   REST_JAX_TEST_RESULTS=path)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
             *self.nodeids], cwd=self.rootdir, env=env, capture_output=True, text=True,
            timeout=900, check=False)
        self.output = proc.stdout[-4000:] + proc.stderr[-4000:]
        self.results = {}
        if os.path.exists(path):
          with open(path, encoding="utf-8") as f:
            self.results = json.load(f)
    return self.results.get(nodeid, {"outcome": "failed", "text": "no result from the child "
                                     "pytest at XLA's default level:\n" + self.output})


class DefaultXlaItem(pytest.Item):
  """Stands for a ``default_xla`` test: reports its outcome in the default-level child."""

  def __init__(self, *, runner: _DefaultXlaRunner, **kwargs):
    super().__init__(**kwargs)
    self.runner = runner

  def runtest(self):
    result = self.runner.result(self.nodeid)
    if result.get("stdout"):
      print(result["stdout"])
    if result["outcome"] == "skipped":
      pytest.skip(result["text"])
    if result["outcome"] != "passed":
      raise AssertionError(f"at XLA's default optimisation level:\n{result['text']}")

  def repr_failure(self, excinfo):  # pylint: disable=arguments-differ
    return str(excinfo.value)

  def reportinfo(self):
    return self.path, None, f"{self.name} [fresh process, default XLA level]"


def pytest_runtest_logreport(report):
  """In the default-level child: record each test's outcome for the parent."""
  path = os.environ.get("REST_JAX_TEST_RESULTS")
  if not (DEFAULT_XLA and path) or (report.when != "call" and report.passed):
    return
  results = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  previous = results.get(report.nodeid, {})
  if previous.get("outcome") in ("failed", "skipped"):
    return  # A failed or skipped setup stands.
  text = report.longreprtext if not report.passed else ""
  if report.skipped and isinstance(report.longrepr, tuple):
    text = report.longrepr[2]
  results[report.nodeid] = {"outcome": report.outcome, "text": text,
                            "stdout": report.capstdout}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f)
