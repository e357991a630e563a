"""Learned and remote rewards on 2 processes (jax.distributed on localhost) against 1.

Each host scores its own rows: a ``learned:`` reward model lives on a mesh of the host's own
devices (``meshes.host_local_layout``), a ``remote:`` reward posts the host's rows to the server.
tests/multihost_reward_worker.py is one process; the full 2-process runs with these rewards are
in test_multihost.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import multihost_reward_worker
from test_multihost import REPO, REWARD_ATOL, _env, _free_port, _tail, _wait

WORKER = os.path.join(REPO, "tests", "multihost_reward_worker.py")


def _score_on(out: str, num_processes: int, rewards: dict) -> list[subprocess.Popen]:
  """Starts multihost_reward_worker.py's scoring on ``num_processes`` processes (4 CPU devices
  in all); each writes OUT.p{i}.npz, its log OUT.p{i}.log."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    args = dict(num_processes=num_processes, process_id=i, coordinator=f"127.0.0.1:{port}",
                rewards=rewards, out=out)
    log = open(f"{out}.p{i}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, WORKER, "score", json.dumps(args)],
                                  env=_env(4 // num_processes), stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO))
  return procs


def test_each_host_scores_its_own_rows_with_learned_and_remote_rewards(reward_model,
                                                                       reward_server, tmp_path):
  # Grow: process 0 scores 13 rows, process 1 the other 8 (4 and 2 reward-model calls, 5 and 3
  # requests), on a run Layout with fsdp 2 inside each host; evaluation: both score the same 21
  # rows (reward and the monitor's BLEU). Equal to 1 process x 4 devices scoring all rows.
  rewards = {"learned": f"learned:{reward_model}", "remote": f"remote:{reward_server}"}
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  procs = _score_on(one, 1, rewards) + _score_on(two, 2, rewards)  # At once: 3 processes.
  codes = _wait(procs, timeout=600)
  assert codes == [0, 0, 0], "\n".join(_tail(f"{o}.p{i}.log") for o, i in
                                       ((one, 0), (two, 0), (two, 1)))
  ref = dict(np.load(f"{one}.p0.npz"))
  hosts = [dict(np.load(f"{two}.p{i}.npz")) for i in range(2)]
  assert [len(h["learned_grow"]) for h in hosts] == [multihost_reward_worker.SPLIT, 8]
  for name in rewards:
    grow = np.concatenate([h[f"{name}_grow"] for h in hosts])
    assert ref[f"{name}_grow"].std() > 0.1  # Spread over (0, 1): each row is read.
    diff = float(np.max(np.abs(grow - ref[f"{name}_grow"])))
    print(f"{name}: max |Grow reward diff| 2 processes vs 1: {diff:.3g}")
    # The server scores every row on one process: the remote rewards are exact.
    assert diff <= (REWARD_ATOL if name == "learned" else 0.0), name
    for key in ("eval_reward", "eval_exact_match", "eval_independent", "eval_independent_se"):
      for host in hosts:  # Every host evaluates the same rows.
        tolerance = REWARD_ATOL if key == "eval_reward" and name == "learned" else 0.0
        assert abs(host[f"{name}_{key}"] - ref[f"{name}_{key}"]) <= tolerance, (name, key)
  # The fake greedy decodes are the worker's HYPOTHESES: 5 of 21 equal their references.
  assert ref["learned_eval_exact_match"] == pytest.approx(5 / 21)
  assert 0 < ref["learned_eval_independent"] < 1
  np.testing.assert_allclose(ref["remote_grow"], ref["learned_grow"], atol=REWARD_ATOL)

