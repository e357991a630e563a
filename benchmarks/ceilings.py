"""This machine's ceilings (dense matmul FLOP/s, memory bandwidth), timing and memory readings."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn: Callable[[], Any], *, repeats: int) -> dict[str, float]:
  """Runs ``fn`` once to compile/warm up, then ``repeats`` times; seconds of each run.

  ``fn`` must block until its result is ready. Returns {"first_s", "min_s", "median_s"}.
  """
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"first_s": first, "min_s": min(times), "median_s": statistics.median(times)}


def matmul_peak(*, n: int, dtype: Any, repeats: int = 5) -> dict[str, float]:
  """Dense ``[n, n] @ [n, n]`` FLOP/s (2 n^3 per product), best of ``repeats``."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  t = timed(lambda: matmul(a, b).block_until_ready(), repeats=repeats)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds": t["min_s"],
          "flops_per_s": 2.0 * n**3 / t["min_s"]}


def numpy_matmul_peak(*, n: int, repeats: int = 3) -> dict[str, float]:
  """Dense float32 ``[n, n] @ [n, n]`` FLOP/s through numpy (its BLAS), best of ``repeats``."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  t = timed(lambda: a @ b, repeats=repeats)
  return {"n": n, "dtype": "float32", "seconds": t["min_s"], "flops_per_s": 2.0 * n**3 / t["min_s"]}


def matmul_ceiling(*, sizes: tuple[int, ...], dtype: Any, repeats: int = 3) -> dict[str, Any]:
  """The best dense matmul FLOP/s over ``sizes`` and sources: XLA (jit, the run's dtype) and,
  on CPU, numpy's BLAS (float32). Returns {"points": [{source, n, dtype, flops_per_s, ...}],
  "best": the fastest point}."""
  points = []
  for n in sizes:
    points.append({"source": "xla", **matmul_peak(n=n, dtype=dtype, repeats=repeats)})
    if jax.default_backend() == "cpu":
      points.append({"source": "numpy", **numpy_matmul_peak(n=n, repeats=repeats)})
  return {"points": points, "best": max(points, key=lambda p: p["flops_per_s"])}


def memory_bandwidth(*, num_bytes: int, repeats: int = 5) -> dict[str, float]:
  """Bytes/s of a large array copy: the better of jitted ``x + 1`` on the default device and,
  on CPU, numpy's ``copyto`` (memcpy); both count the bytes read and the bytes written."""
  x = jnp.zeros((num_bytes // 4,), jnp.float32)
  add = jax.jit(lambda v: v + 1.0)
  t = timed(lambda: add(x).block_until_ready(), repeats=repeats)
  out = {"bytes": num_bytes, "jax_add_bytes_per_s": 2.0 * num_bytes / t["min_s"]}
  best = out["jax_add_bytes_per_s"]
  if jax.default_backend() == "cpu":
    src, dst = np.ones(num_bytes // 4, np.float32), np.empty(num_bytes // 4, np.float32)
    t = timed(lambda: np.copyto(dst, src), repeats=repeats)
    out["numpy_copy_bytes_per_s"] = 2.0 * num_bytes / t["min_s"]
    best = max(best, out["numpy_copy_bytes_per_s"])
  out["bytes_per_s"] = best
  return out


def peak_memory() -> dict[str, Any]:
  """Peak host RSS (bytes) of this process and the device's peak bytes in use (or None)."""
  host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.
  device_peak, device_limit = None, None
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
    device_limit = stats.get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (backends without memory_stats)
    pass
  return {"host_peak_rss_bytes": host, "device_peak_bytes": device_peak,
          "device_bytes_limit": device_limit}


def linearity(xs: list[float], ys: list[float]) -> dict[str, Any]:
  """Least-squares fit ``y = a + b x``; the worst ratio between a point and the fit (>= 1)."""
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
  intercept = my - slope * mx
  ratios = []
  for x, y in zip(xs, ys):
    fit = intercept + slope * x
    ratios.append(max(y / fit, fit / y) if fit > 0 and y > 0 else float("inf"))
  return {"intercept_s": intercept, "slope_s": slope, "max_deviation_ratio": max(ratios),
          "linear_within_1.2x": max(ratios) <= 1.2}
