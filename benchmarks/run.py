"""``python -m benchmarks.run --out results.json [--quick | --gpu] [--presets ...]``.

One run measures the machine's ceilings, then Grow sampling and the Improve train step against
them, how their cost grows with N, output length and batch tokens, peak memory, and (where
torch + transformers are installed) ``transformers`` ``generate`` on the same weights. Writes
JSON and prints a table. Every number is relative to ceilings measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax

from benchmarks import ceilings, costs, hf_compare, profiles, report, workloads
from rest_jax import storage

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def _dtypes(backend: str) -> tuple[str, str, str]:
  """(activation dtype, sampling param dtype, training param dtype) for this backend."""
  if backend in ACCELERATORS:
    return "bfloat16", "bfloat16", "float32"
  return "float32", "float32", "float32"


class Budget:
  """Skips work that would start after ``seconds``; records what it skipped and why."""

  def __init__(self, seconds: float, *, on_done: Callable[[], None] = lambda: None):
    self.deadline = time.perf_counter() + seconds
    self.skipped: list[str] = []
    self.on_done = on_done
    self.partial: list[dict[str, Any]] = []  # Every case run so far, in order.

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    if time.perf_counter() > self.deadline:
      self.skipped.append(f"{name}: time budget spent")
      print(f"[bench] skip {name}: time budget spent", flush=True)
      return None
    print(f"[bench] {name}", flush=True)
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (one failure must not lose the rest)
      traceback.print_exc()
      self.skipped.append(f"{name}: {type(e).__name__}: {e}")
      result = None
    self.partial.append({"case": name, "result": result})
    self.on_done()
    return result


SECTIONS = ("grow", "improve", "hf", "scaling")


def run(profile: profiles.Profile, *, presets: list[str] | None = None,
        sections: tuple[str, ...] = SECTIONS,
        save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
  """Runs the measurements of ``profile`` in ``sections``; returns the results dict (README).

  ``save(results)`` is called after every case with the results so far (partial results
  survive a run that is killed).
  """
  started = time.perf_counter()
  backend = jax.default_backend()
  dtype, sample_pdtype, train_pdtype = _dtypes(backend)
  budget = Budget(profile.time_budget_s, on_done=lambda: save(results))
  keep = lambda preset: presets is None or preset in presets
  results: dict[str, Any] = {
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"backend": backend, "device": str(jax.local_devices()[0].device_kind),
                  "num_devices": jax.local_device_count(), "cpu_count": os.cpu_count(),
                  "jax_version": jax.__version__, "dtype": dtype,
                  "sampling_param_dtype": sample_pdtype, "train_param_dtype": train_pdtype}}
  matmul = ceilings.matmul_peak(n=profile.matmul_n, dtype=dtype)
  bandwidth = ceilings.memory_bandwidth(num_bytes=profile.bandwidth_bytes)
  results["ceilings"] = {"matmul": matmul, "bandwidth": bandwidth}
  results["cases_so_far"] = budget.partial  # Replaced by the sections below at the end.
  peak, bw = matmul["flops_per_s"], bandwidth["bytes_per_s"]
  grow_config = lambda p: workloads.model_config(p, dtype=dtype, param_dtype=sample_pdtype)
  train_config = lambda p: workloads.model_config(p, dtype=dtype, param_dtype=train_pdtype)

  def grow(case: profiles.GrowCase, **overrides) -> dict | None:
    fields = dict(prompts=case.prompts, num_samples=case.num_samples,
                  input_len=case.input_len, max_decode_len=case.max_decode_len,
                  cache_segment=profile.cache_segment)
    fields.update(overrides)
    return budget.run(f"grow {case.preset} {fields}", lambda: dict(
        preset=case.preset, **workloads.grow(grow_config(case.preset), repeats=profile.repeats,
                                             peak_flops=peak, bandwidth=bw, **fields)))

  def improve(case: profiles.ImproveCase, **overrides) -> dict | None:
    fields = dict(batch=case.batch, input_len=case.input_len, target_len=case.target_len,
                  **overrides)
    return budget.run(f"improve {case.preset} {fields}", lambda: dict(
        preset=case.preset, **workloads.improve(train_config(case.preset),
                                                repeats=profile.repeats, peak_flops=peak,
                                                **fields)))

  results["grow"] = [r for r in (grow(c) for c in profile.grow
                                 if keep(c.preset) and "grow" in sections) if r]
  results["improve"] = [r for r in (improve(c) for c in profile.improve
                                    if keep(c.preset) and "improve" in sections) if r]

  results["hf_compare"] = _hf_section(profile, budget, selected="hf" in sections,
                                      keep=keep(profile.hf_preset), grow_config=grow_config)
  results["scaling"] = _scaling_section(profile, grow, improve) if "scaling" in sections else {
      "preset": profile.scaling_preset}
  del results["cases_so_far"]
  _judge(results, profile, dtype=dtype, peak=peak, bw=bw, grow_config=grow_config)
  results["memory"] = ceilings.peak_memory()
  results["skipped"] = budget.skipped
  results["targets"] = report.targets(results)
  results["wall_s"] = time.perf_counter() - started
  return results


def _hf_section(profile: profiles.Profile, budget: Budget, *, selected: bool, keep: bool,
                grow_config: Callable[[str], Any]) -> dict[str, Any]:
  """The transformers ``generate`` comparison, or why it was skipped."""
  reason = "section not selected" if not selected else hf_compare.unavailable()
  if reason is None and keep:
    rows = budget.run(f"transformers comparison {profile.hf_preset}", lambda: hf_compare.compare(
        grow_config(profile.hf_preset), batches=list(profile.hf_batches),
        input_len=profile.hf_input_len, max_new_tokens=profile.hf_new_tokens,
        repeats=profile.repeats))
    return ({"preset": profile.hf_preset, "rows": rows} if rows
            else {"skipped": "failed or out of time (see skipped)"})
  reason = reason or f"preset {profile.hf_preset} not selected"
  print(f"[bench] skip transformers comparison: {reason}", flush=True)
  return {"skipped": reason}


def _scaling_section(profile: profiles.Profile, grow: Callable[..., dict | None],
                     improve: Callable[..., dict | None]) -> dict[str, Any]:
  """Grow time against samples and length, Improve time against tokens, with linear fits."""
  scaling: dict[str, Any] = {"preset": profile.scaling_preset}
  base = profiles.GrowCase(profile.scaling_preset, profile.scaling_prompts, 1,
                           profile.scaling_input_len, profile.scaling_length)
  for key, xs, field, segment in (
      ("grow_vs_num_samples", profile.scaling_num_samples, "num_samples",
       profile.cache_segment),
      ("grow_vs_length", profile.scaling_lengths, "max_decode_len", profile.cache_segment),
      # Before the segmented KV cache (every step attends to all max_decode_len slots).
      ("grow_vs_length_full_cache", profile.scaling_lengths, "max_decode_len", None)):
    fixed = {} if field == "num_samples" else {"num_samples": 4}
    points = []
    for x in xs:
      case = profiles.GrowCase(**{**base.__dict__, **fixed, field: x})
      row = grow(case, cache_segment=segment)
      if row:
        points.append({"x": x, "seconds": row["seconds"], "tokens_per_s": row["tokens_per_s"]})
    scaling[key] = {"x": field, "points": points}
    if len(points) >= 3:
      scaling[key]["fit"] = ceilings.linearity([p["x"] for p in points],
                                               [p["seconds"] for p in points])
  points = []
  for b in profile.scaling_train_batches:
    row = improve(profiles.ImproveCase(profile.scaling_preset, b, profile.scaling_input_len,
                                       profile.scaling_length))
    if row:
      points.append({"x": row["tokens"], "seconds": row["seconds"], "mfu": row["mfu"]})
  scaling["improve_vs_tokens"] = {"x": "tokens", "points": points}
  if len(points) >= 3:
    scaling["improve_vs_tokens"]["fit"] = ceilings.linearity(
        [p["x"] for p in points], [p["seconds"] for p in points])
  return scaling


def _judge(results: dict[str, Any], profile: profiles.Profile, *, dtype: str, peak: float,
           bw: float, grow_config: Callable[[str], Any]) -> None:
  """MFU and roofline fractions against the better of the ceilings read at start and end."""
  # Other processes may share this machine: measure the ceilings again and judge everything
  # against the better of the two readings (ratios never exceed what the machine can do).
  again = ceilings.matmul_peak(n=profile.matmul_n, dtype=dtype)
  again_bw = ceilings.memory_bandwidth(num_bytes=profile.bandwidth_bytes)
  results["ceilings"]["matmul_at_end"], results["ceilings"]["bandwidth_at_end"] = again, again_bw
  peak, bw = max(peak, again["flops_per_s"]), max(bw, again_bw["bytes_per_s"])
  results["ceilings"]["peak_flops_used"], results["ceilings"]["bandwidth_used"] = peak, bw
  for row in results["improve"]:
    row["mfu"] = row["model_flops"] / row["seconds"] / peak
  for row in results["grow"]:
    roof = costs.grow_roofline(
        grow_config(row["preset"]), prompts=row["prompts"], rows=row["rows"],
        input_len=row["input_len"], steps=row["decode_steps"], peak_flops=peak, bandwidth=bw)
    row["roofline_s"] = roof["roofline_s"]
    row["roofline_fraction"] = roof["roofline_s"] / row["seconds"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="where to write the results JSON")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
  group.add_argument("--gpu", action="store_true",
                     help="accelerator sizes (wmt_base, decoder_base, decoder_1b; ~5 min)")
  parser.add_argument("--presets", nargs="+", default=None,
                      help="only the cases of these model presets")
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                      help="which measurements to run (the ceilings always run)")
  parser.add_argument("--improve_batch", type=int, default=None,
                      help="override the batch size of the Improve cases (e.g. a slow machine)")
  parser.add_argument("--time_budget", type=float, default=None,
                      help="seconds after which remaining cases are skipped")
  args = parser.parse_args(argv)
  profile = profiles.PROFILES["quick" if args.quick else "gpu" if args.gpu else "cpu"]
  if args.time_budget is not None:
    profile = profiles.dataclasses.replace(profile, time_budget_s=args.time_budget)
  if args.improve_batch is not None:
    profile = profiles.dataclasses.replace(profile, improve=tuple(
        profiles.dataclasses.replace(c, batch=args.improve_batch) for c in profile.improve))
  name = "quick" if args.quick else "gpu" if args.gpu else "cpu"

  def save(results: dict[str, Any]) -> None:
    storage.write_json(args.out, dict(results, profile=name))

  results = run(profile, presets=args.presets, sections=tuple(args.sections), save=save)
  results["profile"] = name
  save(results)
  print(report.table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
