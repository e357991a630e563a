"""``python -m benchmarks.run --out results.json [--quick | --gpu | --profile P] [--presets ...]``.

One run measures the machine's ceilings, then Grow sampling and the Improve train step against
them, how their cost grows with N, output length and batch tokens, peak memory, the sampling
draw of one decode step, and (where torch + transformers are installed) ``transformers``
``generate`` on the same weights, greedy and sampled. Writes JSON and prints a table.

Denominators (``results["denominators"]``, named next to every fraction printed): on CPU the
best matmul measured in the same run (XLA or numpy's BLAS, over several sizes, with the
thread count set), with the theoretical peak beside it; on an accelerator in the spec table
(``benchmarks.machine``) the chip's specified dense bf16 peak and HBM bandwidth, with the
measured matmul beside it. An unknown profile, section or preset, or a missing optional peer,
is listed under ``skipped`` with the reason; the rest of the run goes on.
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

from benchmarks import (ceilings, costs, hf_compare, machine, profiles, prompt_cache, report,
                        sampling, t5x_compare, workloads)
from rest_jax import storage

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def _dtypes(backend: str) -> tuple[str, str, str]:
  """(activation dtype, sampling param dtype, training param dtype) for this backend."""
  if backend in ACCELERATORS:
    return "bfloat16", "bfloat16", "float32"
  return "float32", "float32", "float32"


def _load() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (other processes on a shared machine)."""
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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


SECTIONS = ("grow", "improve", "hf", "scaling", "sampling", "t5x", "prompt_cache")


def _ceilings(profile: profiles.Profile, *, dtype: str, threads: dict[str, Any]) -> dict:
  """Matmul (best over sizes and sources) and bandwidth, measured; the machine's paper peaks."""
  out: dict[str, Any] = {
      "matmul": ceilings.matmul_ceiling(sizes=profile.matmul_sizes, dtype=dtype),
      "bandwidth": ceilings.memory_bandwidth(num_bytes=profile.bandwidth_bytes),
      "threads": threads}
  if jax.default_backend() == "cpu":
    out["cpu"] = machine.cpu(threads["threads"])
  else:
    out["spec"] = machine.accelerator_spec(str(jax.local_devices()[0].device_kind))
  return out


def _check_names(profile: profiles.Profile, presets: list[str] | None,
                 sections: tuple[str, ...], skipped: list[str]) -> tuple[list | None, tuple]:
  """Drops unknown presets and sections, saying so in ``skipped``; returns the known ones."""
  known = sorted({c.preset for c in (*profile.grow, *profile.improve)} |
                 {profile.scaling_preset, profile.hf_preset})
  for name in presets or ():
    if name not in known:
      skipped.append(f"preset {name}: not measured by this profile (its presets: "
                     f"{', '.join(known)})")
  for name in sections:
    if name not in SECTIONS:
      skipped.append(f"section {name}: unknown (sections: {', '.join(SECTIONS)})")
  if presets is not None:
    presets = [p for p in presets if p in known]
  return presets, tuple(s for s in sections if s in SECTIONS)


def run(profile: profiles.Profile, *, presets: list[str] | None = None,
        sections: tuple[str, ...] = SECTIONS, threads: int | None = None,
        t5x_python: str | None = None,
        save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
  """Runs the measurements of ``profile`` in ``sections``; returns the results dict (README).

  ``threads``: CPUs to run on (None: all this process may use). ``t5x_python``: the Python of
  an environment with t5x, for the t5x peer (None: skipped). ``save(results)`` is called
  after every case with the results so far (partial results survive a run that is killed).
  """
  started = time.perf_counter()
  thread_info = machine.set_threads(threads)
  backend = jax.default_backend()
  dtype, sample_pdtype, train_pdtype = _dtypes(backend)
  budget = Budget(profile.time_budget_s, on_done=lambda: save(results))
  presets, sections = _check_names(profile, presets, sections, budget.skipped)
  keep = lambda preset: presets is None or preset in presets
  results: dict[str, Any] = {
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"backend": backend, "device": str(jax.local_devices()[0].device_kind),
                  "num_devices": jax.local_device_count(), "cpu_count": os.cpu_count(),
                  "threads": thread_info["threads"], "load_average_at_start": _load(),
                  "jax_version": jax.__version__, "dtype": dtype,
                  "sampling_param_dtype": sample_pdtype, "train_param_dtype": train_pdtype}}
  results["ceilings"] = _ceilings(profile, dtype=dtype, threads=thread_info)
  results["denominators"] = _denominators(results["ceilings"])
  results["cases_so_far"] = budget.partial  # Replaced by the sections below at the end.
  peak, bw = results["denominators"]["flops_per_s"], results["denominators"]["bytes_per_s"]
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
  results["sampling"] = (budget.run("sampling draw, categorical vs inverse CDF", lambda: (
      sampling.measure(rows=profile.sampling_rows, vocab=profile.sampling_vocab,
                       repeats=max(profile.repeats, 2)))) or [] if "sampling" in sections else [])
  results["prompt_cache"] = (budget.run("prompt cache shared by N samples vs copied", lambda: (
      prompt_cache.measure(presets=profile.prompt_cache_presets,
                           num_samples=profile.prompt_cache_num_samples,
                           input_len=profile.prompt_cache_input_len,
                           max_decode_len=profile.prompt_cache_length,
                           repeats=max(profile.repeats, 2)))) or []
                             if "prompt_cache" in sections else [])
  results["hf_compare"] = _hf_section(profile, budget, selected="hf" in sections,
                                      keep=keep(profile.hf_preset), grow_config=grow_config)
  results["t5x_compare"] = t5x_compare.section(
      profile, budget, selected="t5x" in sections, python=t5x_python)
  results["scaling"] = _scaling_section(profile, grow, improve) if "scaling" in sections else {
      "preset": profile.scaling_preset}
  del results["cases_so_far"]
  _judge(results, profile, dtype=dtype, grow_config=grow_config)
  results["memory"] = ceilings.peak_memory()
  results["machine"]["load_average_at_end"] = _load()
  results["skipped"] = budget.skipped
  results["targets"] = report.targets(results)
  results["wall_s"] = time.perf_counter() - started
  return results


def _denominators(c: dict[str, Any]) -> dict[str, Any]:
  """The MFU and roofline denominators, each named by where it comes from.

  Measured: the better of the readings at the start and (once ``_judge`` ran) the end. On an
  accelerator in the spec table the spec peaks are the denominators; elsewhere the measured.
  """
  readings = [c["matmul"]["best"]] + ([c["matmul_at_end"]["best"]] if "matmul_at_end" in c
                                      else [])
  best = max(readings, key=lambda p: p["flops_per_s"])
  best_bw = max(c["bandwidth"]["bytes_per_s"], c.get("bandwidth_at_end", {}).get("bytes_per_s", 0))
  out = {"measured_flops_per_s": best["flops_per_s"],
         "measured_flops_source": f"best measured matmul ({best['source']}, n={best['n']}, "
                                  f"{best['dtype']}, {c['threads']['threads']} threads)",
         "measured_bytes_per_s": best_bw}
  spec = c.get("spec")
  if spec:
    out.update(flops_per_s=spec["bf16_flops_per_s"], bytes_per_s=spec["hbm_bytes_per_s"],
               flops_source=f"{spec['chip']} spec dense bf16 peak",
               bandwidth_source=f"{spec['chip']} spec HBM bandwidth")
  else:
    out.update(flops_per_s=best["flops_per_s"], bytes_per_s=best_bw,
               flops_source=out["measured_flops_source"],
               bandwidth_source="best measured copy bandwidth")
  cpu = c.get("cpu") or {}
  if cpu.get("theoretical_flops_per_s"):
    out["theoretical_flops_per_s"] = cpu["theoretical_flops_per_s"]
    out["theoretical_source"] = ("theoretical peak (estimate)" if cpu["theoretical_is_estimate"]
                                 else "theoretical peak")
    # A measured matmul above the paper peak means the clock read is below the boost clock.
    out["theoretical_below_measured"] = cpu["theoretical_flops_per_s"] < best["flops_per_s"]
  return out


def _hf_section(profile: profiles.Profile, budget: Budget, *, selected: bool, keep: bool,
                grow_config: Callable[[str], Any]) -> dict[str, Any]:
  """The transformers ``generate`` comparison (greedy and sampled), or why it was skipped."""
  if not selected:
    return {"skipped": "section not selected"}
  reason = hf_compare.unavailable()
  if reason is None and keep:
    rows = budget.run(f"transformers comparison {profile.hf_preset}", lambda: hf_compare.compare(
        grow_config(profile.hf_preset), batches=list(profile.hf_batches),
        input_len=profile.hf_input_len, max_new_tokens=profile.hf_new_tokens,
        repeats=profile.repeats, temperature=profile.hf_temperature))
    return ({"preset": profile.hf_preset, "rows": rows} if rows
            else {"skipped": "failed or out of time (see skipped)"})
  reason = reason or f"preset {profile.hf_preset} not selected"
  budget.skipped.append(f"transformers comparison: {reason}")
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


def _judge(results: dict[str, Any], profile: profiles.Profile, *, dtype: str,
           grow_config: Callable[[str], Any]) -> None:
  """MFU and roofline fractions against the denominators (measured: start and end readings)."""
  # Other processes may share this machine: measure the ceilings again and judge everything
  # against the better of the two readings (ratios never exceed what the machine can do).
  c = results["ceilings"]
  c["matmul_at_end"] = ceilings.matmul_ceiling(sizes=profile.matmul_sizes, dtype=dtype)
  c["bandwidth_at_end"] = ceilings.memory_bandwidth(num_bytes=profile.bandwidth_bytes)
  d = results["denominators"] = _denominators(c)
  for row in results["improve"]:
    achieved = row["model_flops"] / row["seconds"]
    row["mfu"] = achieved / d["flops_per_s"]
    row["mfu_vs_measured"] = achieved / d["measured_flops_per_s"]
    if "theoretical_flops_per_s" in d:
      row["mfu_vs_theoretical"] = achieved / d["theoretical_flops_per_s"]
  for row in results["grow"]:
    for suffix, peak, bw in (("", d["flops_per_s"], d["bytes_per_s"]),
                             ("_measured", d["measured_flops_per_s"], d["measured_bytes_per_s"])):
      roof = costs.grow_roofline(
          grow_config(row["preset"]), prompts=row["prompts"], rows=row["rows"],
          input_len=row["input_len"], steps=row["decode_steps"], peak_flops=peak, bandwidth=bw)
      row["roofline_s" + suffix] = roof["roofline_s"]
      row["roofline_fraction" + suffix] = roof["roofline_s"] / row["seconds"]


def _unknown_profile(name: str, threads: int | None) -> dict[str, Any]:
  """The results of a run whose profile is unknown: nothing measured, and why."""
  thread_info = machine.set_threads(threads)
  return {"profile": name, "machine": {"backend": jax.default_backend(),
                                       "device": str(jax.local_devices()[0].device_kind),
                                       "threads": thread_info["threads"]},
          "skipped": [f"profile {name}: unknown (profiles: {', '.join(profiles.PROFILES)}); "
                      "nothing measured"]}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="where to write the results JSON")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
  group.add_argument("--gpu", action="store_true",
                     help="accelerator sizes (wmt_base, decoder_base, decoder_1b; ~5 min)")
  group.add_argument("--profile", default=None,
                     help=f"a profile by name ({', '.join(profiles.PROFILES)}; default cpu)")
  parser.add_argument("--presets", nargs="+", default=None,
                      help="only the cases of these model presets (unknown ones are listed "
                           "under skipped)")
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS),
                      help=f"which measurements to run, of {', '.join(SECTIONS)} (the "
                           "ceilings always run; unknown ones are listed under skipped)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPUs to run on, for XLA and the BLAS alike (default: all this "
                           "process may use); recorded in the results")
  parser.add_argument("--t5x_python", default=None,
                      help="python of a separate environment with t5x installed: runs t5x's "
                           "train step and temperature_sample on the same shapes (a peer)")
  parser.add_argument("--improve_batch", type=int, default=None,
                      help="override the batch size of the Improve cases (e.g. a slow machine)")
  parser.add_argument("--time_budget", type=float, default=None,
                      help="seconds after which remaining cases are skipped")
  args = parser.parse_args(argv)
  name = args.profile or ("quick" if args.quick else "gpu" if args.gpu else "cpu")

  def save(results: dict[str, Any]) -> None:
    storage.write_json(args.out, dict(results, profile=name))

  if name not in profiles.PROFILES:
    results = _unknown_profile(name, args.threads)
    save(results)
    print(report.table(results))
    return 2
  profile = profiles.PROFILES[name]
  if args.time_budget is not None:
    profile = profiles.dataclasses.replace(profile, time_budget_s=args.time_budget)
  if args.improve_batch is not None:
    profile = profiles.dataclasses.replace(profile, improve=tuple(
        profiles.dataclasses.replace(c, batch=args.improve_batch) for c in profile.improve))
  results = run(profile, presets=args.presets, sections=tuple(args.sections),
                threads=args.threads, t5x_python=args.t5x_python, save=save)
  results["profile"] = name
  save(results)
  print(report.table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
