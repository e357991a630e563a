"""Learned and remote rewards on 2 processes (jax.distributed on localhost) against 1.

Each host scores its own rows: a ``learned:`` reward model lives on a mesh of the host's own
devices (``meshes.host_local_layout``), a ``remote:`` reward posts the host's rows to the server.
tests/multihost_reward_worker.py is one of the 2 processes; the 1-process reference runs in the
test (at XLA's default level, as the processes). The full 2-process runs with these rewards are
in test_multihost.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import multihost_reward_worker
from conftest import mesh_layout
from test_multihost import REPO, REWARD_ATOL, _env, _free_port, _tail, _wait

WORKER = os.path.join(REPO, "tests", "multihost_reward_worker.py")


def _score_on_two_processes(out: str, rewards: dict) -> list[subprocess.Popen]:
  """Starts multihost_reward_worker.py on 2 processes of 2 CPU devices; each writes
  OUT.p{i}.npz, its log OUT.p{i}.log."""
  port = _free_port()
  procs = []
  for i in range(2):
    args = dict(process_id=i, coordinator=f"127.0.0.1:{port}", rewards=rewards, out=out)
    log = open(f"{out}.p{i}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, WORKER, "score", json.dumps(args)],
                                  env=_env(2), stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
  return procs


# Slow (about 90 s on 2 loaded cores): the default suite's 2-process runs (test_multihost.py)
# already score with a learned reward; this adds uneven rows per host and a remote reward.
@pytest.mark.slow
@pytest.mark.default_xla  # The workers run at XLA's default level: so must the reference.
def test_each_host_scores_its_own_rows_with_learned_and_remote_rewards(reward_model,
                                                                       reward_server, tmp_path):
  # Grow: process 0 scores 13 rows, process 1 the other 8 (4 and 2 reward-model calls, 5 and 3
  # requests), on a run Layout with fsdp 2 inside each host; evaluation: both score the same 21
  # rows (reward, exact match and the monitor's BLEU). Equal to 1 process x 4 devices (here,
  # the same mesh over 4 of this process's devices) scoring all rows.
  rewards = {"learned": f"learned:{reward_model}", "remote": f"remote:{reward_server}"}
  two = str(tmp_path / "two")
  procs = _score_on_two_processes(two, rewards)
  try:
    ref = multihost_reward_worker.results(
        rewards, mesh_layout(-1, 2, devices=jax.devices()[:4]), slice(0, len(multihost_reward_worker.SOURCES)))
  finally:
    codes = _wait(procs, timeout=600)
  assert codes == [0, 0], "\n".join(_tail(f"{two}.p{i}.log") for i in range(2))
  hosts = [dict(np.load(f"{two}.p{i}.npz")) for i in range(2)]
  assert [len(h["learned_grow"]) for h in hosts] == [multihost_reward_worker.SPLIT, 8]
  for name in rewards:
    grow = np.concatenate([h[f"{name}_grow"] for h in hosts])
    assert ref[f"{name}_grow"].std() > 0.1  # Spread over (0, 1): each row is read.
    diff = float(np.max(np.abs(grow - ref[f"{name}_grow"])))
    eval_diff = max(abs(h[f"{name}_eval_reward"] - ref[f"{name}_eval_reward"]) for h in hosts)
    print(f"{name}: max |reward diff| 2 processes vs 1: Grow {diff:.3g}, eval {eval_diff:.3g}")
    # The server scores every host's rows in one process: the remote rewards are exact.
    tolerance = REWARD_ATOL if name == "learned" else 0.0
    assert diff <= tolerance and eval_diff <= tolerance, name
    for key in ("eval_exact_match", "eval_independent", "eval_independent_se"):
      for host in hosts:  # Every host evaluates the same rows.
        assert host[f"{name}_{key}"] == ref[f"{name}_{key}"], (name, key)
  # The fake greedy decodes are the worker's HYPOTHESES: 5 of 21 equal their references.
  assert ref["learned_eval_exact_match"] == pytest.approx(5 / 21)
  assert 0 < ref["learned_eval_independent"] < 1
  # The server's model (this process, on all 8 devices) against the same model on 4.
  diff = float(np.max(np.abs(ref["remote_grow"] - ref["learned_grow"])))
  print(f"remote vs learned (1 process): max |diff| {diff:.3g}")
  assert diff <= REWARD_ATOL
