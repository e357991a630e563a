"""The issue's targets checked against the results, and the printed table."""

from __future__ import annotations

from typing import Any

from benchmarks import prompt_cache


def _first(items: list[dict], **match) -> dict | None:
  for row in items:
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each target: what, the measured value, the goal and whether it is met (None: not run)."""
  out = []
  d = results.get("denominators", {})

  def add(name: str, value: float | None, goal: float, higher: bool = True):
    met = None if value is None else (value >= goal if higher else value <= goal)
    out.append({"target": name, "value": value, "goal": goal, "met": met})

  for preset in ("wmt_base", "decoder_base"):
    train = _first(results.get("improve", []), preset=preset)
    add(f"Improve {preset} MFU (vs {d.get('flops_source')})", train and train["mfu"], 0.5)
  grow = _first(results.get("grow", []), preset="wmt_base", rows=256)
  add(f"Grow wmt_base 256 rows: fraction of roofline (vs {d.get('flops_source')} and "
      f"{d.get('bandwidth_source')})", grow and grow["roofline_fraction"], 0.3)
  hf = results.get("hf_compare", {}).get("rows") or []
  for mode in ("greedy", "sampled"):
    for batch, goal in ((8, 3.0), (256, 1.5)):
      row = _first(hf, batch=batch, mode=mode)
      add(f"tokens/s vs transformers generate ({mode}), batch {batch}", row and row["speedup"],
          goal)
  t5x = results.get("t5x_compare", {}).get("rows") or []
  for prefix, goal_name in (("Improve step (both", "Improve tokens/s vs t5x (both AdamW)"),
                            ("Grow", "Grow tokens/s vs t5x temperature_sample, 256 rows")):
    row = next((r for r in t5x if r["what"].startswith(prefix) and
                (prefix != "Grow" or r["shape"].startswith("256 x 1 "))), None)
    add(goal_name, row and row["ratio"], 1.5)
  for key in ("grow_vs_num_samples", "grow_vs_length", "improve_vs_tokens"):
    fit = results.get("scaling", {}).get(key, {}).get("fit")
    add(f"{key}: max deviation from linear", fit and fit["max_deviation_ratio"], 1.2,
        higher=False)
  return out


def _fmt(x: Any) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.3g}"
  return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _ceilings(results: dict[str, Any]) -> list[str]:
  """Lines on the ceilings measured, the paper peaks and the denominators used."""
  c, d = results["ceilings"], results["denominators"]
  th = c["threads"]
  lines = [f"threads: {th['threads']} of {th['cpus_available']} CPUs (XLA by CPU affinity; "
           f"{th['blas']} threads {th['blas_threads']})"]
  if "cpu" in c:
    cpu = c["cpu"]
    lines.append(f"CPU: {cpu['model']} (family {cpu['family']}, model {cpu['model_number']}); "
                 f"{d.get('theoretical_source', 'theoretical peak unknown')}: "
                 f"{_fmt(cpu['theoretical_flops_per_s'] and cpu['theoretical_flops_per_s'] / 1e9)}"
                 f" GFLOP/s = {cpu['theoretical_basis']}"
                 + ("; below the measured matmul" if d.get("theoretical_below_measured") else ""))
  if c.get("spec"):
    lines.append(f"spec: {c['spec']['chip']} {c['spec']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s "
                 f"dense bf16, {c['spec']['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM")
  rows = []
  for when in ("matmul", "matmul_at_end"):
    for p in c.get(when, {}).get("points", []):
      rows.append(["start" if when == "matmul" else "end", p["source"], p["n"], p["dtype"],
                   p["flops_per_s"] / 1e9])
  lines += ["", "matmul ceilings (GFLOP/s)",
            _table(["when", "source", "n", "dtype", "GFLOP/s"], rows), ""]
  lines.append(f"bandwidth: {c['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s at the start, "
               f"{c.get('bandwidth_at_end', {}).get('bytes_per_s', 0) / 1e9:.1f} GB/s at the end")
  lines.append(f"denominators: FLOP/s {d['flops_per_s'] / 1e9:.1f} G = {d['flops_source']}; "
               f"bytes/s {d['bytes_per_s'] / 1e9:.1f} G = {d['bandwidth_source']}")
  return lines


def table(results: dict[str, Any]) -> str:
  """Markdown tables of every section (and what was skipped, with why)."""
  m = results["machine"]
  parts = [f"machine: {m['backend']} {m['device']} x{m.get('num_devices', 1)}, dtype "
           f"{m.get('dtype')}, started {results.get('started_utc')}, "
           f"wall {results.get('wall_s', 0):.0f} s, load average (1/5/15 min) "
           f"{m.get('load_average_at_start')} at the start, {m.get('load_average_at_end')} at "
           "the end"]
  if "ceilings" not in results:
    return "\n".join(parts + ["", "skipped: " + "; ".join(results.get("skipped", []))])
  d = results["denominators"]
  parts += _ceilings(results)
  parts += ["", f"Grow (Sampler.generate); of roofline = roofline s / s, roofline vs "
            f"{d['flops_source']} and {d['bandwidth_source']}"]
  parts.append(_table(
      ["preset", "prompts", "N", "rows", "in", "out", "s", "tokens/s", "prompts/s",
       "roofline s", "of roofline", "of roofline (measured ceilings)"],
      [[r["preset"], r["prompts"], r["num_samples"], r["rows"], r["input_len"],
        r["max_decode_len"], r["seconds"], r["tokens_per_s"], r["prompts_per_s"],
        r["roofline_s"], r["roofline_fraction"], r.get("roofline_fraction_measured")]
       for r in results["grow"]]))
  parts += ["", f"Improve (Trainer.train_step, BC loss, AdamW); MFU vs {d['flops_source']}; "
            f"vs measured = vs {d['measured_flops_source']}; vs theoretical = vs "
            f"{d.get('theoretical_source', '-')}"]
  parts.append(_table(
      ["preset", "batch", "in", "target", "tokens", "s", "tokens/s", "MFU", "MFU vs measured",
       "MFU vs theoretical"],
      [[r["preset"], r["batch"], r["input_len"], r["target_len"], r["tokens"], r["seconds"],
        r["tokens_per_s"], r["mfu"], r.get("mfu_vs_measured"), r.get("mfu_vs_theoretical")]
       for r in results["improve"]]))
  parts += ["", "Sampling draw of one decode step (categorical = before, inverse CDF = now)"]
  parts.append(_table(
      ["rows", "vocab", "temperature", "top_k", "top_p", "categorical s", "inverse CDF s",
       "speedup"],
      [[r["rows"], r["vocab"], r.get("temperature"), r.get("top_k"), r.get("top_p"),
        r["categorical_s"], r["inverse_cdf_s"], r["speedup"]]
       for r in results.get("sampling", [])]))
  parts += ["", "Prompt cache shared by the N samples of a prompt against copied into every row "
            "(same samples)"]
  parts.append(_table(
      ["preset", "N", "in", "out", "cache/prompt copied / shared", "temp copied / shared",
       "tokens/s shared / copied"],
      [[r["preset"], r["num_samples"], next(x["input_len"] for x in results["prompt_cache"]),
        next(x["max_decode_len"] for x in results["prompt_cache"]),
        r["cache_bytes_copied_over_shared"], r["temp_bytes_copied_over_shared"],
        r["tokens_per_s_shared_over_copied"]]
       for r in prompt_cache.ratios(results.get("prompt_cache", []))]))
  s = results["scaling"]
  parts += ["", f"Scaling ({s['preset']}): seconds per call / step"]
  for key in ("grow_vs_num_samples", "grow_vs_length", "grow_vs_length_full_cache",
              "improve_vs_tokens"):
    entry = s.get(key, {})
    fit = entry.get("fit") or {}
    points = ", ".join(f"{p['x']}: {p['seconds']:.3g}" for p in entry.get("points", []))
    parts.append(f"- {key} ({entry.get('x')}): {points}; max deviation from linear "
                 f"{_fmt(fit.get('max_deviation_ratio'))}")
  hf = results.get("hf_compare", {})
  parts += ["", "transformers generate (same weights; sampled: same temperature, no top-k/p)"]
  if "rows" in hf:
    parts.append(_table(
        ["mode", "batch", "in", "new", "ours tokens/s", "HF tokens/s", "speedup",
         "token agreement"],
        [[r.get("mode", "greedy"), r["batch"], r["input_len"], r["max_new_tokens"],
          r["ours_tokens_per_s"], r["hf_tokens_per_s"], r["speedup"], r.get("token_agreement")]
         for r in hf["rows"]]))
  else:
    parts.append(f"skipped: {hf.get('skipped')}")
  t5x = results.get("t5x_compare", {})
  parts += ["", "t5x peer (same T5.1.1 configuration and shapes; ratio = ours / t5x tokens/s)"]
  if "rows" in t5x:
    parts.append(_table(["what", "shape", "ours tokens/s", "t5x tokens/s", "ratio"],
                        [[r["what"], r["shape"], r["ours_tokens_per_s"], r["t5x_tokens_per_s"],
                          r["ratio"]] for r in t5x["rows"]]))
  else:
    parts.append(f"skipped: {t5x.get('skipped')}")
  mem = results["memory"]
  parts += ["", f"memory: host peak RSS {mem['host_peak_rss_bytes'] / 2**30:.2f} GiB, device "
            f"peak {_fmt(mem['device_peak_bytes'] and mem['device_peak_bytes'] / 2**30)} GiB",
            "", "Targets"]
  parts.append(_table(["target", "value", "goal", "met"],
                      [[t["target"], t["value"], t["goal"], t["met"]]
                       for t in results["targets"]]))
  if results.get("skipped"):
    parts += ["", "skipped: " + "; ".join(results["skipped"])]
  return "\n".join(parts)
