"""Improve input at scale: host memory flat in the Grow set size, and input throughput.

``python -m benchmarks.improve_input --out benchmarks/results/improve_input_cpu.json``

1. Writes synthetic Grow sets of ``--records`` tiny records (default 1M and 8M; 7 samples and
   one original per prompt, as 4 hosts write them) with the library's own writer, index pass and
   ``finalize``.
2. For each set and each process count of ``--processes`` (default 2 and 4), starts that many
   local processes (``jax.distributed``, gloo CPU collectives). Each selects the Improve set with
   the others (``improve.selected``, threshold 0.5), then runs ``--steps`` Improve steps: its rows
   of each global batch from ``ImproveBatches`` and a tiny jitted train step on the global batch.
   It reports its peak RSS (``ru_maxrss``) and the RSS after start-up (imports, jax.distributed).
3. ``--only_readers``: the other per-host readers of a Grow set (``rest-jax inspect``'s report,
   the value network's data), peak RSS per set size: flat, as none reads the whole index.
4. Input throughput: one process reads batches of wmt_base-sized records (64 input and 64
   target tokens) from a 200k-record set; records/s per host, against what the wmt_base train
   step consumes on one H200 (benchmarks/results/h200_gpu_profile.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES, PROMPTS_PER_CHUNK, HOSTS = 7, 4096, 4


def _rss_mb() -> float:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(key: str, kind: int, value: bytes) -> bytes:
  """One ``features`` map entry: key -> Feature{kind: List{value}} (kind 1: one bytes value;
  2 and 3: packed floats or varints)."""
  return _field(1, _field(1, key.encode()) + _field(2, _field(kind, _field(1, value))))


def _example(p: int, s: int, tokens: int, logprobs: bytes, *, inputs: int | None = None,
             targets: int | None = None, reward: float | None = None) -> bytes:
  """The serialized tf.train.Example of one synthetic record, encoded by hand (what a protobuf
  parser reads from ``GrowRecord.serialize`` of the same record)."""
  ints = lambda values: b"".join(_varint(v) for v in values)  # pylint: disable=unnecessary-lambda-assignment
  if reward is None:
    reward = 1.0 if s < 0 else ((p * 7 + s * 13) % 64) / 64
  inputs = 2 + p % 97 if inputs is None else inputs
  targets = 3 + (p + s) % 89 if targets is None else targets
  body = b"".join([
      _feature("example_id", 3, ints([p])), _feature("sample_idx", 3, ints([s])),
      _feature("inputs", 3, ints([inputs] * (tokens - 1) + [1])),
      _feature("targets", 3, ints([targets] * (tokens - 1) + [1])),
      _feature("inputs_pretokenized", 1, b""),
      _feature("targets_pretokenized", 1, b""),
      _feature("reward", 2, struct.pack("<f", reward)), _feature("behaviour_logprobs", 2, logprobs),
      _feature("is_original", 3, ints([int(s < 0)])), _feature("grow_step", 3, ints([1]))])
  return _field(1, body)


_ID_BASE = 1 << 20  # example ids in [2^20, 2^21): 3-byte varints, fixed positions.
_SENTINELS = {"id": _ID_BASE + 0x2A5A5, "inputs": 0x55, "targets": 0x66, "reward": 0.123456789}


def _encode(ids: np.ndarray, samples: int, tokens: int, logprobs: bytes) -> np.ndarray:
  """uint8 `[n, bytes]`: the serialized records of sample ``samples`` (-1: the original) of the
  prompts ``ids`` (in [2^20, 2^21)), filled into a hand-encoded template by column (every
  variable field has a fixed width), the same bytes ``_example`` gives one at a time."""
  sentinel = np.frombuffer(_example(_SENTINELS["id"], samples, tokens, logprobs,
                                    inputs=_SENTINELS["inputs"], targets=_SENTINELS["targets"],
                                    reward=_SENTINELS["reward"]), np.uint8)

  def at(pattern: bytes) -> int:
    hits = [i for i in range(len(sentinel)) if bytes(sentinel[i:i + len(pattern)]) == pattern]
    assert len(hits) == 1, pattern
    return hits[0]

  out = np.tile(sentinel, (ids.size, 1))
  pos = at(_varint(_SENTINELS["id"]))
  for k in range(3):
    out[:, pos + k] = ((ids >> (7 * k)) & 0x7F) | (0x80 if k < 2 else 0)
  for key, value in (("inputs", 2 + ids % 97), ("targets", 3 + (ids + samples) % 89)):
    pos = at(bytes([_SENTINELS[key]] * (tokens - 1) + [1]))
    out[:, pos:pos + tokens - 1] = value[:, None]
  reward = (np.ones(ids.size) if samples < 0 else ((ids * 7 + samples * 13) % 64) / 64)
  pos = at(struct.pack("<f", _SENTINELS["reward"]))
  out[:, pos:pos + 4] = reward.astype("<f4").view(np.uint8).reshape(-1, 4)
  return out


def write_host(directory: str, records: int, host: int, tokens: int) -> None:
  """Host ``host``'s chunks of a synthetic Grow set (prompt p on host p % HOSTS), committed as
  ``GrowWriter`` commits them (a temporary name, renamed whole)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  from rest_jax.grow import dataset as growdata  # pylint: disable=g-import-not-at-top
  prompts = np.arange(host, records // (SAMPLES + 1), HOSTS) + _ID_BASE
  writer = growdata.GrowWriter(directory, host_id=host)
  done = writer.completed_chunks()
  logprobs = (-0.25 * np.arange(1, tokens + 1)).astype("<f4").tobytes()
  for k in range(0, len(prompts), PROMPTS_PER_CHUNK):
    if k // PROMPTS_PER_CHUNK in done:
      continue
    ids = prompts[k:k + PROMPTS_PER_CHUNK]
    rows = [_encode(ids, s, tokens, logprobs) for s in range(-1, SAMPLES)]
    final = storage.join(directory, growdata.chunk_name(host, k // PROMPTS_PER_CHUNK))
    with storage.atomic_path(final, overwrite=False) as tmp, tf.io.TFRecordWriter(tmp) as out:
      for i in range(ids.size):
        for part in rows:
          out.write(part[i].tobytes())


def index_host(directory: str, host: int) -> None:
  from rest_jax.grow import dataset as growdata  # pylint: disable=g-import-not-at-top
  growdata.index_chunks(directory, host_id=host, num_hosts=HOSTS)


def _python(*args: str, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "benchmarks.improve_input", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
  outs = [p.communicate()[0] for p in procs]
  for p, out in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"a benchmark process failed:\n{out[-3000:]}")
  return outs


def make_dataset(directory: str, records: int, tokens: int = 3) -> dict:
  """Writes (or reuses) a finalized synthetic Grow set; returns how long each part took."""
  from rest_jax.grow import dataset as growdata  # pylint: disable=g-import-not-at-top
  if growdata.is_complete(directory):
    return {"reused": True}
  times = {}
  start = time.perf_counter()
  for group in ([0, 1], [2, 3]):  # Two writers at a time (a 2-core machine).
    _wait_all([_python("--write_host", directory, str(records), str(h), str(tokens))
               for h in group])
  times["write_s"] = time.perf_counter() - start
  start = time.perf_counter()
  for group in ([0, 1], [2, 3]):
    _wait_all([_python("--index_host", directory, str(h)) for h in group])
  times["index_s"] = time.perf_counter() - start
  start = time.perf_counter()
  peak0 = _peak_mb()
  stats = growdata.finalize(directory)
  times["finalize_s"] = time.perf_counter() - start
  times["finalize_peak_rss_mb"] = _peak_mb()
  times["peak_rss_before_finalize_mb"] = peak0
  times["count"] = stats.count
  return times


def worker(data: str, sel: str, process: int, processes: int, port: int, steps: int,
           batch: int) -> None:
  """One host of the memory run: prints one JSON line."""
  from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  if processes > 1:
    distributed.initialize(distributed.DistributedSettings(
        coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from rest_jax.improve import batches, selected  # pylint: disable=g-import-not-at-top
  from rest_jax.improve.schedules import Threshold  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  rows_sharding = NamedSharding(mesh, P("data"))
  weights = jax.device_put(jnp.zeros((128, 8)), NamedSharding(mesh, P()))

  @jax.jit
  def train_step(w, tokens, reward):
    def loss(w):
      emb = w[tokens % 128].mean(axis=1)
      return ((emb.sum(-1) - reward) ** 2).mean()
    return w - 0.1 * jax.grad(loss)(w)

  rss_start = _rss_mb()
  start = time.perf_counter()
  rules = selected.Rules(threshold=Threshold(0.5))
  chosen = selected.select_to_disk([data], sel, rules, host_id=process, num_hosts=processes,
                                   barrier=distributed.barrier)
  select_s = time.perf_counter() - start
  rss_selected, peak_selected = _rss_mb(), _peak_mb()
  rows = distributed.process_rows(rows_sharding, batch)
  loader = batches.ImproveBatches(chosen, batch_size=batch, seed=0, rows=rows, input_len=8,
                                  target_len=8)
  stream = loader.iterate(0)
  start = time.perf_counter()
  for _ in range(steps):
    host = next(stream)
    tokens = jax.make_array_from_process_local_data(rows_sharding, host["targets"])
    reward = jax.make_array_from_process_local_data(rows_sharding, host["reward"])
    weights = train_step(weights, tokens, reward)
  jax.block_until_ready(weights)
  steps_s = time.perf_counter() - start
  print("RESULT " + json.dumps({
      "process": process, "processes": processes, "selected": chosen.count,
      "buckets": int(len(chosen.bucket_counts)), "select_s": round(select_s, 2),
      "steps": steps, "batch": batch, "steps_s": round(steps_s, 2),
      "rss_after_start_mb": round(rss_start, 1), "rss_after_select_mb": round(rss_selected, 1),
      "peak_rss_after_select_mb": round(peak_selected, 1),
      "peak_rss_mb": round(_peak_mb(), 1), "rss_end_mb": round(_rss_mb(), 1),
      "weights_checksum": float(np.asarray(jax.device_get(weights)).sum())}), flush=True)
  distributed.barrier("benchmark done")


def readers(data: str, examples: int) -> None:
  """The per-host readers besides the Improve loader, on one Grow set: ``rest-jax inspect``'s
  report and the value network's first ``examples`` records; prints one JSON line."""
  from rest_jax import tasks  # pylint: disable=g-import-not-at-top
  from rest_jax.cli import inspection  # pylint: disable=g-import-not-at-top
  from rest_jax.improve import selection  # pylint: disable=g-import-not-at-top
  rss_start = _rss_mb()
  start = time.perf_counter()
  lines = inspection._describe_step(1, data, 3)  # pylint: disable=protected-access
  inspect_s, peak_inspect = time.perf_counter() - start, _peak_mb()
  start = time.perf_counter()
  dataset = selection.value_dataset(data, include_originals=False,
                                    output_features=tasks.ENCDEC_FEATURES)
  read = sum(1 for _ in dataset.take(examples).as_numpy_iterator())
  print("RESULT " + json.dumps({
      "rss_after_start_mb": round(rss_start, 1), "inspect_s": round(inspect_s, 2),
      "inspect_lines": len(lines), "peak_rss_after_inspect_mb": round(peak_inspect, 1),
      "value_records_read": read, "value_s": round(time.perf_counter() - start, 2),
      "peak_rss_mb": round(_peak_mb(), 1)}), flush=True)


def readers_run(root: str, sizes: list[int]) -> dict:
  """Peak RSS of ``readers`` (its own process) per Grow set size, and the largest over the
  smallest."""
  out: dict = {"runs": {}}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  for records in sizes:
    data = os.path.join(root, f"grow_{records}", "g001")
    make_dataset(data, records)
    (text,) = _wait_all([_python("--readers", data, "20000", env=env)])
    (line,) = [l for l in text.splitlines() if l.startswith("RESULT ")]
    out["runs"][str(records)] = json.loads(line[len("RESULT "):])
  peaks = [out["runs"][str(r)]["peak_rss_mb"] for r in sizes]
  out["peak_rss_largest_over_smallest"] = round(peaks[-1] / peaks[0], 3)
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def memory_run(data: str, work: str, processes: int, steps: int, batch: int) -> list[dict]:
  sel = os.path.join(work, f"selection-p{processes}")
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  storage.rmtree(sel)  # Measure the selection too.
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=REPO,
             TF_CPP_MIN_LOG_LEVEL="3")
  procs = [_python("--worker", data, sel, str(i), str(processes), str(port), str(steps),
                   str(batch), env=env) for i in range(processes)]
  outs = _wait_all(procs)
  return [json.loads(line[len("RESULT "):]) for out in outs for line in out.splitlines()
          if line.startswith("RESULT ")]


def throughput(data: str, work: str, batch: int, batches_read: int) -> dict:
  """Records/s of one host reading wmt_base-sized records (64 + 64 tokens)."""
  from rest_jax.improve import batches, selected  # pylint: disable=g-import-not-at-top
  from rest_jax.improve.schedules import Threshold  # pylint: disable=g-import-not-at-top
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  storage.rmtree(os.path.join(work, "selection-wmt"))
  chosen = selected.select_to_disk([data], os.path.join(work, "selection-wmt"),
                                   selected.Rules(threshold=Threshold(0.0)))
  out = {"records": chosen.count, "batch": batch}
  out["load_average_before"] = os.getloadavg()
  rates: dict[int, list[float]] = {1: [], 4: [], 8: []}
  for _ in range(3):  # Interleaved rounds, the median kept: the machine's load varies.
    for workers, runs in rates.items():
      loader = batches.ImproveBatches(chosen, batch_size=batch, seed=0, rows=slice(0, batch),
                                      input_len=64, target_len=64)
      stream = loader.iterate(0, workers=workers, prefetch=2 * workers)
      next(stream)
      start = time.perf_counter()
      for _ in range(batches_read):
        next(stream)
      runs.append(batch * batches_read / (time.perf_counter() - start))
      stream.close()
  for workers, runs in rates.items():
    out[f"records_per_s_{workers}_threads"] = round(float(np.median(runs)), 1)
    out[f"records_per_s_{workers}_threads_runs"] = [round(r, 1) for r in runs]
  profile = os.path.join(REPO, "benchmarks", "results", "h200_gpu_profile.json")
  with open(profile, encoding="utf-8") as f:
    (case,) = [c for c in json.load(f)["improve"] if c["preset"] == "wmt_base"]
  consumed = case["batch"] / case["median_s"]
  out["wmt_base_train_examples_per_s_h200"] = round(consumed, 1)
  out["wmt_base_case"] = {k: case[k] for k in ("batch", "input_len", "target_len", "median_s")}
  out["input_over_consumption_4_threads"] = round(out["records_per_s_4_threads"] / consumed, 2)
  out["load_average_after"] = os.getloadavg()
  out["cpu_count"] = os.cpu_count()
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, nargs="+", default=[1_000_000, 8_000_000])
  parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--root", default="/tmp/rest_jax_improve_input")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                    "improve_input_cpu.json"))
  parser.add_argument("--skip_throughput", action="store_true")
  parser.add_argument("--only_readers", action="store_true",
                      help="measure inspect and the value data's reader per --records, updating "
                           "--out")
  parser.add_argument("--only_throughput", action="store_true",
                      help="rerun the throughput part only, updating --out")
  args = parser.parse_args(argv)
  if args.only_readers:
    from rest_jax import storage  # pylint: disable=g-import-not-at-top
    result = storage.read_json(args.out)
    result["readers"] = readers_run(args.root, sorted(args.records))
    storage.write_json(args.out, result)
    print(json.dumps(result["readers"], indent=1))
    return
  if args.only_throughput:
    from rest_jax import storage  # pylint: disable=g-import-not-at-top
    result = storage.read_json(args.out)
    data = os.path.join(args.root, "grow_wmt_200000", "g001")
    make_dataset(data, 200_000, tokens=64)
    result["throughput"] = throughput(data, args.root, args.batch, 200)
    storage.write_json(args.out, result)
    print(json.dumps(result["throughput"], indent=1))
    return
  result: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "cpu_count": os.cpu_count(), "datasets": {}, "memory": [], "ratios": {}}
  for records in args.records:
    data = os.path.join(args.root, f"grow_{records}", "g001")
    print(f"[improve_input] dataset {records} records", flush=True)
    result["datasets"][str(records)] = make_dataset(data, records)
    for processes in args.processes:
      print(f"[improve_input] {records} records, {processes} processes", flush=True)
      hosts = memory_run(data, os.path.join(args.root, f"work_{records}"), processes,
                         args.steps, args.batch)
      result["memory"].append({"records": records, "processes": processes, "hosts": hosts})
  for processes in args.processes:
    peaks = {r["records"]: max(h["peak_rss_mb"] for h in r["hosts"]) for r in result["memory"]
             if r["processes"] == processes}
    if len(peaks) > 1:
      lo, hi = min(peaks), max(peaks)
      result["ratios"][f"{processes}_processes_peak_rss_{hi}_over_{lo}"] = round(
          peaks[hi] / peaks[lo], 3)
  if not args.skip_throughput:
    data = os.path.join(args.root, "grow_wmt_200000", "g001")
    result["datasets"]["wmt_200000"] = make_dataset(data, 200_000, tokens=64)
    result["throughput"] = throughput(data, args.root, args.batch, 200)
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  storage.write_json(args.out, result)
  print(json.dumps({"ratios": result["ratios"], "throughput": result.get("throughput")},
                   indent=1))


if __name__ == "__main__":
  if sys.argv[1:2] == ["--write_host"]:
    write_host(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
  elif sys.argv[1:2] == ["--index_host"]:
    index_host(sys.argv[2], int(sys.argv[3]))
  elif sys.argv[1:2] == ["--readers"]:
    readers(sys.argv[2], int(sys.argv[3]))
  elif sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:9]))
  else:
    main(sys.argv[1:])
