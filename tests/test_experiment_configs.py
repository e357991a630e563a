"""Every gin file under gin/experiments parses into a RunConfig (user paths overridden)."""

import dataclasses
import glob
import json
import os

import pytest

from rest_jax import config as C
from rest_jax.cli import main
from tokenizer_fixtures import build_hf_tokenizer, build_spm

EXPERIMENTS = sorted(glob.glob(os.path.join(main.REPO_GIN_DIR, "experiments", "*.gin")))
# Other gin files with placeholders for user paths (tests/test_cli.py parses the rest).
USER_PATH_FILES = sorted(
    p for p in glob.glob(os.path.join(main.REPO_GIN_DIR, "*", "*.gin"))
    if "/experiments/" not in p and "/path/to/" in open(p, encoding="utf-8").read())
_HAS_INIT_CHECKPOINT = "init_checkpoint" in {f.name for f in dataclasses.fields(C.RunConfig)}


@pytest.fixture(scope="module")
def user_paths(tmp_path_factory):
  d = tmp_path_factory.mktemp("user")
  rows = "\n".join(json.dumps({"prompt": "a", "reference": "b", "problem": "1+1",
                               "solution": r"\boxed{2}"}) for _ in range(2))
  for name in ("train.jsonl", "eval.jsonl"):
    (d / name).write_text(rows + "\n")
  return {"spm": build_spm(str(d)), "hf": build_hf_tokenizer(str(d)), "dir": str(d)}


def _bindings(path, paths):
  text = open(path, encoding="utf-8").read()
  bindings = []
  if "paper" in os.path.basename(path):
    bindings.append(f"VOCABULARY = 'spm:{paths['spm']}'")
  if "gsm8k" in path or "math" in path:
    bindings += [f"VOCABULARY = 'hf:{paths['hf']}?pad=<unk>'", "CHECKPOINT = 'hf:/models/x'"]
  elif "'spm:/path/to" in text:
    bindings.append(f"VOCABULARY = 'spm:{paths['spm']}'")
  if "MATH_TRAIN" in text:
    bindings += [f"MATH_TRAIN = '{paths['dir']}/train.jsonl'",
                 f"MATH_EVAL = '{paths['dir']}/eval.jsonl'"]
  if "user_files" in path or "user_files" in text:
    bindings += [f"TRAIN_FILE = '{paths['dir']}/train.jsonl'",
                 f"EVAL_FILE = '{paths['dir']}/eval.jsonl'"]
  return bindings


def test_experiments_exist():
  names = {os.path.basename(p) for p in EXPERIMENTS}
  assert {"iwslt_tiny_paper.gin", "wmt_base_paper.gin", "gsm8k_restem.gin"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_parses(path, user_paths):
  if "init_checkpoint" in open(path, encoding="utf-8").read() and not _HAS_INIT_CHECKPOINT:
    pytest.skip("RunConfig.init_checkpoint comes with the convert branch")
  cfg, text = main.parse_run_config([path], _bindings(path, user_paths))
  assert isinstance(cfg, C.RunConfig) and text
  name = os.path.basename(path)
  if name == "iwslt_tiny_paper.gin":
    assert (cfg.task, cfg.model.num_heads, cfg.model.mlp_dim) == ("iwslt14_de_en", 4, 1024)
    assert (cfg.grow.sampling.num_samples, cfg.grow.sampling.temperature) == (100, 0.8)
    assert (cfg.num_grow_steps, cfg.num_improve_steps) == (1, 5)
    assert cfg.improve.thresholds == C.PAPER_THRESHOLDS
    assert cfg.grow.sampling.max_decode_len == 128
  if name == "wmt_base_paper.gin":
    assert (cfg.task, cfg.model.num_heads, cfg.model.mlp_dim) == ("wmt20_zh_en", 8, 2048)
    assert (cfg.grow.sampling.num_samples, cfg.grow.sampling.temperature) == (25, 0.8)
    assert (cfg.num_grow_steps, cfg.num_improve_steps) == (1, 4)
    assert cfg.improve.thresholds == C.PAPER_THRESHOLDS
  if name == "gsm8k_restem.gin":
    assert (cfg.task, cfg.reward, cfg.model.kind) == ("gsm8k", "gsm8k_answer", "decoder")
    assert cfg.init_checkpoint == "hf:/models/x"
    assert cfg.improve.restart_from_base and cfg.improve.max_per_prompt == 10
  if name == "user_files_cpu.gin":
    assert cfg.task == "user_task"
  if name == "online_arith_cpu.gin":
    assert (cfg.algorithm, cfg.task, cfg.online.prompts_per_step, cfg.online.regrow_every) == (
        "online", "arith", 32, 1)
    # Equal samples drawn: 62 online steps x 32 x 4 against ReST's 2,000 prompts x 4.
    assert cfg.online.num_steps * 32 * cfg.grow.sampling.num_samples == 7936
  if name == "numbers_de_en_cpu.gin":
    assert cfg.eval.num_test_samples == 4


@pytest.mark.parametrize("path", USER_PATH_FILES, ids=os.path.basename)
def test_task_file_with_user_paths_parses(path, user_paths):
  files = [os.path.join(main.REPO_GIN_DIR, "runs", "base.gin"), path]
  cfg, _ = main.parse_run_config(files, _bindings(path, user_paths))
  assert cfg.task == {"iwslt14_de_en.gin": "iwslt14_de_en", "wmt20_zh_en.gin": "wmt20_zh_en",
                      "gsm8k.gin": "gsm8k", "math_jsonl.gin": "math",
                      "user_files.gin": "user_task"}[os.path.basename(path)]
