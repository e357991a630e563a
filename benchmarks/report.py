"""The issue's targets checked against the results, and the printed table."""

from __future__ import annotations

from typing import Any


def _first(items: list[dict], **match) -> dict | None:
  for row in items:
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each target: what, the measured value, the goal and whether it is met (None: not run)."""
  out = []

  def add(name: str, value: float | None, goal: float, higher: bool = True):
    met = None if value is None else (value >= goal if higher else value <= goal)
    out.append({"target": name, "value": value, "goal": goal, "met": met})

  train = _first(results.get("improve", []), preset="wmt_base")
  add("Improve wmt_base MFU (model FLOPs / measured matmul peak)",
      train and train["mfu"], 0.5)
  grow = _first(results.get("grow", []), preset="wmt_base", rows=256)
  add("Grow wmt_base 256 rows: fraction of roofline", grow and grow["roofline_fraction"], 0.3)
  hf = results.get("hf_compare", {}).get("rows") or []
  for batch, goal in ((8, 3.0), (256, 1.2)):
    row = _first(hf, batch=batch)
    add(f"tokens/s vs transformers generate, batch {batch}", row and row["speedup"], goal)
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


def table(results: dict[str, Any]) -> str:
  """Markdown tables of every section."""
  m, c = results["machine"], results["ceilings"]
  parts = [f"machine: {m['backend']} {m['device']} x{m['num_devices']}, dtype {m['dtype']}, "
           f"started {results['started_utc']}, wall {results.get('wall_s', 0):.0f} s",
           f"ceilings: matmul {c['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s "
           f"({c['matmul']['dtype']}, n={c['matmul']['n']}), bandwidth "
           f"{c['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s at the start; "
           f"{c.get('matmul_at_end', {}).get('flops_per_s', 0) / 1e9:.1f} GFLOP/s, "
           f"{c.get('bandwidth_at_end', {}).get('bytes_per_s', 0) / 1e9:.1f} GB/s at the end; "
           f"ratios use the better: {c.get('peak_flops_used', 0) / 1e9:.1f} GFLOP/s, "
           f"{c.get('bandwidth_used', 0) / 1e9:.1f} GB/s", "", "Grow (Sampler.generate)"]
  parts.append(_table(
      ["preset", "prompts", "N", "rows", "in", "out", "s", "tokens/s", "prompts/s",
       "roofline s", "of roofline"],
      [[r["preset"], r["prompts"], r["num_samples"], r["rows"], r["input_len"],
        r["max_decode_len"], r["seconds"], r["tokens_per_s"], r["prompts_per_s"],
        r["roofline_s"], r["roofline_fraction"]] for r in results["grow"]]))
  parts += ["", "Improve (Trainer.train_step, BC loss, AdamW)"]
  parts.append(_table(
      ["preset", "batch", "in", "target", "tokens", "s", "tokens/s", "MFU"],
      [[r["preset"], r["batch"], r["input_len"], r["target_len"], r["tokens"], r["seconds"],
        r["tokens_per_s"], r["mfu"]] for r in results["improve"]]))
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
  parts += ["", "transformers generate (greedy, same weights)"]
  if "rows" in hf:
    parts.append(_table(
        ["batch", "in", "new", "ours tokens/s", "HF tokens/s", "speedup", "token agreement"],
        [[r["batch"], r["input_len"], r["max_new_tokens"], r["ours_tokens_per_s"],
          r["hf_tokens_per_s"], r["speedup"], r["token_agreement"]] for r in hf["rows"]]))
  else:
    parts.append(f"skipped: {hf.get('skipped')}")
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
