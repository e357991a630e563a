"""Smoke test of ``python -m benchmarks.run --quick``: it runs and writes the expected JSON.

No timing is asserted (times depend on the machine); the cost model is checked by hand.
"""

from __future__ import annotations

import json

from benchmarks import ceilings, costs, run
from rest_jax.models import count_params, abstract_model, get_preset


def test_cost_model_counts_every_matrix_parameter():
  for name in ("tiny", "wmt_base", "decoder_base"):
    config = get_preset(name)
    p = costs.matmul_params(config)
    total = count_params(abstract_model(config))
    e, h = config.d_model, config.num_heads
    embed = config.vocab_size * e
    norms = e * (2 * config.num_encoder_layers + 3 * config.num_decoder_layers + 2)
    if config.kind == "encdec":
      relpos = 2 * h * config.relative_attention_num_buckets
      assert p["encoder"] + p["decoder"] + embed + norms + relpos == total
    else:
      norms = e * (2 * config.num_decoder_layers + 1)
      assert p["decoder"] + embed + norms == total


def test_train_flops_by_hand():
  config = get_preset("tiny")  # e=32, h*d=32, m=64, vocab 260, 2+2 layers.
  enc = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 2 * (2 * 32 * 32)
  dec = 2 * (6 * 32 * 32 + 3 * 32 * 64) + 32 * 260
  attn = 4 * 3 * 32 * (2 * 5**2 + 2 * (7**2 + 7 * 5))
  assert costs.train_flops(config, batch=3, input_len=5, target_len=7) == 3.0 * (
      2.0 * (enc * 3 * 5 + dec * 3 * 7) + attn)


def test_linearity_fit():
  fit = ceilings.linearity([1, 2, 4], [3.0, 5.0, 9.0])
  assert abs(fit["slope_s"] - 2.0) < 1e-9 and abs(fit["intercept_s"] - 1.0) < 1e-9
  assert abs(fit["max_deviation_ratio"] - 1.0) < 1e-9 and fit["linear_within_1.2x"]
  assert not ceilings.linearity([1, 2, 3], [1.0, 1.0, 4.0])["linear_within_1.2x"]


def test_quick_run_writes_json(tmp_path):
  out = tmp_path / "results.json"
  # The transformers comparison (torch) and the scaling sweeps (a dozen more compiles; their
  # fit is test_linearity_fit) are left out to keep the test fast.
  assert run.main(["--quick", "--out", str(out), "--sections", "grow", "improve"]) == 0
  results = json.loads(out.read_text())
  assert {"machine", "ceilings", "grow", "improve", "scaling", "hf_compare", "memory",
          "targets", "skipped", "wall_s", "profile"} <= set(results)
  assert results["hf_compare"] == {"skipped": "section not selected"}
  assert results["skipped"] == []
  assert results["ceilings"]["matmul"]["flops_per_s"] > 0
  assert results["ceilings"]["bandwidth"]["bytes_per_s"] > 0
  grow, = results["grow"]
  # 8 tokens per row: the first from the prefill's logits, 7 from decode steps.
  assert (grow["rows"], grow["decode_steps"], grow["generated_tokens"]) == (4, 7, 32)
  assert 0 < grow["roofline_fraction"] and grow["tokens_per_s"] > 0
  train, = results["improve"]
  assert train["tokens"] == 4 * 16 and 0 < train["mfu"]
  assert results["memory"]["host_peak_rss_bytes"] > 0
  assert len(results["targets"]) == 7
