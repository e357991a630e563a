"""No reward token in anything a run writes or prints; no pickles or eval in rest_jax."""

import logging
import os
import re
import secrets
import threading

import pytest

from rest_jax.cli import main as cli
from rest_jax.config import RewardConfig
from rest_jax.errors import RestJaxError
from rest_jax.rewards import build_reward
from rest_jax.rewards import ChrF
from rest_jax.rewards.server import make_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "gin", "experiments", "smoke_cpu.gin")


@pytest.fixture
def reward_server():
  token = "tok-" + secrets.token_hex(16)
  server = make_server(ChrF(), token=token, name="chrf")
  threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
  yield token, f"http://127.0.0.1:{server.server_address[1]}/score", server
  server.shutdown()
  server.server_close()


def _files_containing(root, needle):
  hits = []
  for folder, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        if needle in f.read():
          hits.append(os.path.join(folder, name))
  return hits


def test_no_token_in_files_logs_or_errors(tmp_path, capsys, caplog, monkeypatch, reward_server):
  token, url, server = reward_server
  monkeypatch.setenv("RS_SECRET_TOKEN", token)
  caplog.set_level(logging.DEBUG)
  work = str(tmp_path / "w")
  argv = ["run", "--workdir", work, "--gin_file", SMOKE, "--no_progress", "--log_level", "DEBUG",
          f"--gin.config.RunConfig.reward='remote:{url}'",
          "--gin.config.RewardConfig.token_env='RS_SECRET_TOKEN'",
          "--gin.config.RunConfig.num_grow_steps=0", "--gin.bc/config.TrainConfig.num_steps=2",
          "--gin.bc/config.TrainConfig.eval_every=1", "--gin.config.EvalConfig.num_examples=4"]
  assert cli.main(argv) == 0
  assert os.path.exists(os.path.join(work, "tb")) and os.listdir(os.path.join(work, "tb"))
  assert "RS_SECRET_TOKEN" in open(os.path.join(work, "run_config.json")).read()
  assert server.stats["200"] > 0  # The run scored through the server.
  # A wrong token (401) and an unset variable: errors name the variable, never a token.
  monkeypatch.setenv("RS_SECRET_TOKEN", "wrong-" + token[::-1])
  with pytest.raises(RestJaxError, match="HTTP 401.*token_env") as info:
    build_reward("remote:" + url, RewardConfig(token_env="RS_SECRET_TOKEN", max_retries=0))(
        ["a"], ["b"], ["c"])
  monkeypatch.delenv("RS_SECRET_TOKEN")
  assert cli.main(argv[:2] + [str(tmp_path / "w3")] + argv[3:]) == 2
  captured = capsys.readouterr()
  assert "RS_SECRET_TOKEN" in captured.err and "not set" in captured.err
  for secret in (token, token[::-1]):
    assert secret not in captured.out + captured.err + str(info.value)
    assert secret not in caplog.text
    assert not _files_containing(str(tmp_path), secret.encode())


def test_no_pickle_no_eval_in_rest_jax():
  pattern = re.compile(r"allow_pickle\s*=\s*True|\bpickle\.loads?\(|\beval\(|\bexec\(|"
                       r"\bmarshal\.loads?\(")
  hits = []
  for folder, _, names in os.walk(os.path.join(REPO, "rest_jax")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        hits += [f"{path}:{i}" for i, line in enumerate(open(path, encoding="utf-8"), 1)
                 if pattern.search(line)]
  assert not hits
