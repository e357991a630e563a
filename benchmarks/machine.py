"""What the machine is and what it can do on paper: CPU model, thread counts, spec peaks.

CPU: the model and ISA from ``/proc/cpuinfo``, the threads this run uses (set with
``set_threads``: CPU affinity, which sizes XLA:CPU's thread pool, and the BLAS's own count), and
a theoretical float32 peak = cores x FLOPs per cycle x clock, marked as an estimate unless both
the clock (cpufreq's maximum) and the FMA width of the microarchitecture are known.
Accelerators: the chip's specified dense bfloat16 peak and HBM bandwidth (datasheets; sparsity
excluded), the denominator of MFU the way MaxText and others report it.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any

# (device_kind substring, dense bf16 FLOP/s, HBM bytes/s), first match wins (specific first).
# NVIDIA datasheets give bf16 "with sparsity": the dense peak is half of it.
ACCELERATOR_SPECS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 4.8e12),  # H200 SXM.
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # H100 SXM ("NVIDIA H100 80GB HBM3").
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),  # 40 GB.
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v5 lite", 197e12, 0.819e12),  # v5e.
    ("TPU v5e", 197e12, 0.819e12),
    ("TPU v5", 459e12, 2.765e12),  # v5p ("TPU v5" / "TPU v5p").
    ("TPU v6 lite", 918e12, 1.64e12),  # v6e (Trillium).
    ("TPU v6e", 918e12, 1.64e12),
)


def accelerator_spec(device_kind: str) -> dict[str, Any] | None:
  """The specified dense bf16 peak and HBM bandwidth of one chip, or None if not in the table."""
  for name, flops, bandwidth in ACCELERATOR_SPECS:
    if name.lower() in device_kind.lower():
      return {"chip": name, "bf16_flops_per_s": flops, "hbm_bytes_per_s": bandwidth,
              "source": "datasheet, dense (no sparsity)"}
  return None


def _cpuinfo() -> dict[str, str]:
  """The first processor's ``key: value`` lines of /proc/cpuinfo (empty off Linux)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _max_mhz() -> float | None:
  try:
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
      return int(f.read()) / 1000.0
  except (OSError, ValueError):
    return None


def _flops_per_cycle(info: dict[str, str]) -> tuple[int, bool, str]:
  """float32 FLOPs per cycle per core, whether the microarchitecture makes it known, and why."""
  flags = set(info.get("flags", "").split())
  vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
  if vendor == "AuthenticAMD" and family == 25:  # Zen 3 and 4 (AVX-512 double-pumped).
    return 32, True, "AMD family 25 (Zen 3/4): 2 x 256-bit FMA"
  if vendor == "AuthenticAMD" and family == 26:  # Zen 5: 2 x 512-bit FMA.
    return 64, True, "AMD family 26: 2 x 512-bit FMA"
  if "avx512f" in flags:
    return 64, False, "AVX-512, assumed 2 x 512-bit FMA units (some parts have 1)"
  if {"avx2", "fma"} <= flags:
    return 32, False, "AVX2 + FMA, assumed 2 x 256-bit FMA units"
  if "avx" in flags:
    return 16, False, "AVX, no FMA"
  return 8, False, "SSE"


def cpu(threads: int) -> dict[str, Any]:
  """CPU model, ISA and the theoretical float32 peak of ``threads`` cores (see the module)."""
  info = _cpuinfo()
  per_cycle, arch_known, isa = _flops_per_cycle(info)
  mhz, clock = _max_mhz(), "cpufreq cpuinfo_max_freq"
  if mhz is None:
    match = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    mhz, clock = ((float(match.group(1)) * 1000, "the model name's nominal clock") if match
                  else (float(info.get("cpu MHz", "0") or 0) or None,
                        "/proc/cpuinfo 'cpu MHz' (no cpufreq: boost clocks may be higher)"))
  peak = threads * per_cycle * mhz * 1e6 if mhz else None
  return {"model": info.get("model name", "unknown"), "vendor": info.get("vendor_id"),
          "family": info.get("cpu family"), "model_number": info.get("model"),
          "threads_per_core": _threads_per_core(), "clock_mhz": mhz, "clock_source": clock,
          "flops_per_cycle_per_core": per_cycle, "isa": isa,
          "theoretical_flops_per_s": peak,
          "theoretical_is_estimate": not (arch_known and clock.startswith("cpufreq")),
          "theoretical_basis": f"{threads} threads x {per_cycle} FLOP/cycle x {mhz} MHz "
                               f"({isa}; clock from {clock}); each thread counted as a core"}


def _threads_per_core() -> int | None:
  try:
    with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list",
              encoding="utf-8") as f:
      return len([p for p in re.split(r"[,]", f.read().strip()) if p]) or None
  except OSError:
    return None


def _openblas() -> ctypes.CDLL | None:
  """numpy's loaded OpenBLAS (found through this process's memory maps), or None."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
  except OSError:
    return None
  for path in sorted(paths):
    try:
      return ctypes.CDLL(path)
    except OSError:
      continue
  return None


def _blas_call(lib: ctypes.CDLL, suffix: str, *args: int) -> int | None:
  for prefix in ("scipy_openblas_", "openblas_", ""):
    for end in (suffix + "64_", suffix):
      fn = getattr(lib, prefix + end, None)
      if fn is not None:
        return fn(*args)
  return None


def set_threads(threads: int | None) -> dict[str, Any]:
  """Runs this process on ``threads`` CPUs (None: all it may use) and records the counts.

  CPU affinity bounds every thread pool (XLA:CPU sizes its pool by the CPUs the process may
  use when the backend starts); numpy's OpenBLAS is set to the same count. Returns
  {"threads", "cpus_available", "blas", "blas_threads", "env"}.
  """
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  threads = min(threads or len(available) or os.cpu_count() or 1,
                len(available) or threads or 1)
  if available and threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  lib, blas_threads = _openblas(), None
  if lib is not None:
    _blas_call(lib, "set_num_threads", threads)
    blas_threads = _blas_call(lib, "get_num_threads")
  return {"threads": threads, "cpus_available": len(available) or None,
          "blas": "openblas" if lib is not None else "not found",
          "blas_threads": blas_threads,
          "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "MKL_NUM_THREADS", "XLA_FLAGS")}}
