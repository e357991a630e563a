"""Smoke test of ``python -m benchmarks.run --quick``: it runs and writes the expected JSON.

No timing is asserted (times depend on the machine); the cost model is checked against XLA's
own count of the compiled step's FLOPs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import ceilings, costs, hf_compare, machine, run
from rest_jax.models import abstract_model, build_model, count_params, get_preset


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


@pytest.mark.parametrize("preset, batch, input_len, target_len",
                         [("tiny", 3, 5, 7), ("tiny_decoder", 4, 16, 16)])
def test_train_flops_match_xla_count(preset, batch, input_len, target_len):
  # The cost model counts matmuls (and attention) only; XLA's own count of the compiled
  # forward + backward adds the elementwise work, a few percent for these shapes. A matmul the
  # model forgot (the logits layer alone is ~16% of tiny's) or counted twice falls outside.
  config = get_preset(preset)
  graphdef, params = nnx.split(build_model(config, rngs=nnx.Rngs(0)))
  x = jnp.ones((batch, input_len), jnp.int32)
  y = jnp.ones((batch, target_len), jnp.int32)
  grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(x, y).astype(jnp.float32).sum()))
  analysis = grad.lower(params).compile().cost_analysis()
  xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  model = costs.train_flops(config, batch=batch, input_len=input_len, target_len=target_len)
  assert 1.0 <= xla / model <= 1.08, (xla, model)


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
  matmul = results["ceilings"]["matmul"]
  assert {(p["source"], p["n"]) for p in matmul["points"]} == {
      (source, n) for source in ("xla", "numpy") for n in (128, 256)}
  assert matmul["best"]["flops_per_s"] == max(p["flops_per_s"] for p in matmul["points"])
  assert results["ceilings"]["bandwidth"]["bytes_per_s"] > 0
  assert results["ceilings"]["threads"]["threads"] >= 1
  denominators = results["denominators"]
  # On CPU the MFU denominator is the best matmul read at the start or the end of the run.
  best_end = results["ceilings"]["matmul_at_end"]["best"]["flops_per_s"]
  assert denominators["flops_per_s"] == max(matmul["best"]["flops_per_s"], best_end)
  assert denominators["flops_source"].startswith("best measured matmul")
  grow, = results["grow"]
  # 8 tokens per row: the first from the prefill's logits, 7 from decode steps.
  assert (grow["rows"], grow["decode_steps"], grow["generated_tokens"]) == (4, 7, 32)
  assert 0 < grow["roofline_fraction"] and grow["tokens_per_s"] > 0
  train, = results["improve"]
  assert train["tokens"] == 4 * 16 and 0 < train["mfu"]
  assert train["mfu"] == train["model_flops"] / train["seconds"] / denominators["flops_per_s"]
  assert results["memory"]["host_peak_rss_bytes"] > 0
  assert len(results["targets"]) == 12


def test_unknown_names_and_missing_peers_are_listed_not_fatal(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(hf_compare, "unavailable", lambda: "torch not installed (test)")
  out = tmp_path / "results.json"
  assert run.main(["--quick", "--out", str(out), "--sections", "hf", "t5x", "nonsense",
                   "--presets", "tiny_decoder", "no_such_preset"]) == 0
  results = json.loads(out.read_text())
  assert results["skipped"] == [
      "preset no_such_preset: not measured by this profile (its presets: tiny, tiny_decoder)",
      "section nonsense: unknown (sections: grow, improve, hf, scaling, sampling, t5x, "
      "prompt_cache)",
      "transformers comparison: torch not installed (test)",
      "t5x comparison: no t5x environment given (--t5x_python PATH; see docs/benchmarks.md)"]
  assert results["hf_compare"] == {"skipped": "torch not installed (test)"}
  assert "torch not installed (test)" in capsys.readouterr().out
  assert run.main(["--profile", "nonsense", "--out", str(out)]) == 2
  assert json.loads(out.read_text())["skipped"] == [
      "profile nonsense: unknown (profiles: quick, cpu, gpu); nothing measured"]


def test_spec_peaks_and_cpu_description():
  assert machine.accelerator_spec("NVIDIA H100 80GB HBM3")["bf16_flops_per_s"] == 989e12
  assert machine.accelerator_spec("NVIDIA H100 PCIe")["bf16_flops_per_s"] == 756e12
  assert machine.accelerator_spec("NVIDIA H200")["hbm_bytes_per_s"] == 4.8e12
  assert machine.accelerator_spec("TPU v5 lite")["bf16_flops_per_s"] == 197e12
  assert machine.accelerator_spec("TPU v5")["bf16_flops_per_s"] == 459e12
  assert machine.accelerator_spec("TPU v6 lite")["bf16_flops_per_s"] == 918e12
  assert machine.accelerator_spec("cpu") is None
  cpu = machine.cpu(2)
  if cpu["clock_mhz"]:  # Linux with a readable /proc/cpuinfo.
    assert cpu["theoretical_flops_per_s"] == 2 * cpu["flops_per_cycle_per_core"] * cpu[
        "clock_mhz"] * 1e6


def test_prompt_cache_section_compares_shared_and_copied_caches():
  from benchmarks import prompt_cache
  rows = prompt_cache.measure(presets=("tiny_decoder",), num_samples=(3,), prompts=2,
                              input_len=8, max_decode_len=4, repeats=1)
  shared, copied = rows
  assert (shared["share_prompt_cache"], copied["share_prompt_cache"]) == (True, False)
  assert shared["generated_tokens"] == copied["generated_tokens"] == 2 * 3 * 4
  # tiny_decoder: 2 layers of float32 k, v [2 kv heads, 16]: the prompt's 8 slots once (+ mask
  # and length) and 4 slots per sample, against everything 3 times.
  slot = 2 * 2 * 2 * 16 * 4
  assert shared["cache_bytes_per_prompt"] == (8 + 3 * 4) * slot + 8 + 4
  assert copied["cache_bytes_per_prompt"] == 3 * ((8 + 4) * slot + 8 + 4)
  ratio, = prompt_cache.ratios(rows)
  assert ratio["cache_bytes_copied_over_shared"] == copied["cache_bytes_per_prompt"] / (
      shared["cache_bytes_per_prompt"])
