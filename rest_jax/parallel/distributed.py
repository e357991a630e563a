"""Multi-host execution: ``jax.distributed`` start-up, host-0 gating, barriers, per-host rows.

``rest-jax run`` is the same command on every host. ``initialize`` starts ``jax.distributed``:

* from explicit settings (flags ``--coordinator_address/--num_processes/--process_id`` or the
  environment variables ``REST_JAX_COORDINATOR``, ``REST_JAX_NUM_PROCESSES``,
  ``REST_JAX_PROCESS_ID``) when any is given;
* else by jax's cluster auto-detection (Cloud TPU VMs, SLURM, Open MPI, GKE) when one is found;
* else not at all: a single-process run.

It must run before anything touches a jax backend. Afterwards every host builds the same global
mesh; host 0 alone writes logs, progress bars, TensorBoard, reports and completion markers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from rest_jax.errors import RestJaxError

logger = logging.getLogger("rest_jax")

ENV_COORDINATOR = "REST_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "REST_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "REST_JAX_PROCESS_ID"
ENV_HEARTBEAT = "REST_JAX_HEARTBEAT_TIMEOUT_S"
DEFAULT_BARRIER_TIMEOUT_S = 1800.0
_BARRIER_COUNTER = itertools.count()


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """How to start ``jax.distributed`` (all None: auto-detect a cluster, else single process).

  heartbeat_timeout_s: a host that sends no heartbeat for this long is declared dead and every
    other host stops with an error (instead of hanging in a collective).
  barrier_timeout_s: the longest a host waits at a barrier for the others.
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = 100
  initialization_timeout_s: int = 300
  barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  def validate(self) -> None:
    if not self.explicit:
      return
    missing = [n for n, v in (("coordinator address", self.coordinator_address),
                              ("number of processes", self.num_processes),
                              ("process id", self.process_id)) if v is None]
    if missing:
      raise RestJaxError(
          f"multi-host settings are incomplete: no {', '.join(missing)}. Give all three, e.g. "
          "--coordinator_address=HOST0:1234 --num_processes=2 --process_id=0 (or the "
          f"environment variables {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).")
    if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
      raise RestJaxError(f"process_id={self.process_id} must be in [0, num_processes="
                         f"{self.num_processes}); number the hosts 0..num_processes-1.")
    if self.heartbeat_timeout_s < 1 or self.barrier_timeout_s <= 0:
      raise RestJaxError("heartbeat and barrier timeouts must be positive.")


def settings_from(flags: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> DistributedSettings:
  """Settings from CLI flag values (None = unset) falling back to the environment."""
  flags = dict(flags or {})
  environ = os.environ if environ is None else environ

  def pick(flag: str, env: str, kind: type) -> Any:
    if flags.get(flag) is not None:
      return kind(flags[flag])
    value = environ.get(env, "").strip()
    if not value:
      return None
    try:
      return kind(value)
    except ValueError:
      raise RestJaxError(f"environment variable {env}={value!r} is not a valid "
                         f"{kind.__name__}.") from None

  extra = {}
  heartbeat = pick("heartbeat_timeout_s", ENV_HEARTBEAT, int)
  if heartbeat is not None:
    extra["heartbeat_timeout_s"] = heartbeat
  if flags.get("barrier_timeout_s") is not None:
    extra["barrier_timeout_s"] = float(flags["barrier_timeout_s"])
  settings = DistributedSettings(
      coordinator_address=pick("coordinator_address", ENV_COORDINATOR, str),
      num_processes=pick("num_processes", ENV_NUM_PROCESSES, int),
      process_id=pick("process_id", ENV_PROCESS_ID, int), **extra)
  settings.validate()
  return settings


def detected_cluster() -> str | None:
  """The name of the cluster environment jax's auto-detection would use, or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.__name__
  return None


_SETTINGS = DistributedSettings()


def initialize(settings: DistributedSettings) -> int:
  """Starts ``jax.distributed`` as ``settings`` say (see the module docstring).

  Call once per process, before any computation. Returns the number of processes.
  """
  global _SETTINGS
  settings.validate()
  _SETTINGS = settings
  timeouts = dict(heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
                  initialization_timeout=settings.initialization_timeout_s)
  if settings.explicit:
    if settings.num_processes == 1:
      return 1
    logger.info("jax.distributed: process %d of %d, coordinator %s", settings.process_id,
                settings.num_processes, settings.coordinator_address)
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes,
                               process_id=settings.process_id, **timeouts)
  else:
    cluster = detected_cluster()
    if cluster is None:
      return 1
    logger.info("jax.distributed: auto-detected %s", cluster)
    jax.distributed.initialize(**timeouts)
  return jax.process_count()


def is_host0() -> bool:
  """Whether this process writes logs, reports and markers."""
  return jax.process_index() == 0


def barrier(name: str, *, timeout_s: float | None = None) -> None:
  """Waits until every process reaches the barrier ``name`` (a no-op with one process).

  Raises:
    RestJaxError: another process did not arrive within the timeout (it crashed or hangs).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  timeout_s = _SETTINGS.barrier_timeout_s if timeout_s is None else timeout_s
  client = jax_distributed.global_state.client
  if client is None:  # Multi-process without jax.distributed (not expected): no timeout.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  start = time.monotonic()
  try:
    client.wait_at_barrier(f"rest_jax:{next(_BARRIER_COUNTER)}:{name}", int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    raise RestJaxError(
        f"process {jax.process_index()} stopped at barrier {name!r} after "
        f"{time.monotonic() - start:.0f} s (limit {timeout_s:g} s): not every one of the "
        f"{jax.process_count()} processes arrived ({str(e).splitlines()[0]}). "
        "Another host probably crashed: read its log, then rerun the same command on every "
        "host to resume.") from None


def allgather(x: np.ndarray) -> np.ndarray:
  """Every process's host array, stacked: `[process_count, *x.shape]` (same on all hosts)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array on ``sharding`` from a host array that every process holds in full (each
  device takes its own slice)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_array(x: Any) -> np.ndarray:
  """The whole of a (possibly multi-host) array on every host, as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def process_rows(sharding: jax.sharding.Sharding, global_rows: int) -> slice:
  """The rows ``[start, stop)`` of a `[global_rows, ...]` batch this process's devices hold.

  Raises:
    RestJaxError: the processes do not each hold one equal, disjoint block of rows (the
      mesh's batch axes do not split evenly over the hosts).
  """
  indices = sharding.addressable_devices_indices_map((global_rows,)).values()
  spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                  for s in indices})
  start, stop = spans[0][0], spans[-1][1]
  contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  count = jax.process_count()
  if not contiguous or stop - start != global_rows // count or global_rows % count:
    raise RestJaxError(
        f"the batch ({global_rows} rows) does not split into {count} equal blocks, one per "
        "process, on this mesh; make MeshConfig's batch axes (data x fsdp, ICI x DCN) a "
        f"multiple of the {count} processes and the batch sizes multiples of them.")
  return slice(start, stop)


def check_batch_sizes(sizes: Mapping[str, int], *, num_batch_shards: int,
                      processes: bool = True) -> None:
  """Fails at start-up when a global batch size does not split over the mesh and the hosts.

  Args:
    sizes: description -> global batch size (rows), e.g. {"BC batch_size": 64}.
    num_batch_shards: how many ways the mesh splits the batch axis.
    processes: also require a multiple of the number of processes (host-local batches).
  """
  count = jax.process_count() if processes else 1
  for what, size in sizes.items():
    for parts, name in ((num_batch_shards, "the mesh's data-parallel size (batch shards)"),
                        (count, "the number of processes")):
      if size % parts:
        raise RestJaxError(
            f"{what} = {size} is not divisible by {name}, {parts}; choose a multiple of "
            f"{np.lcm(num_batch_shards, count)}, or change MeshConfig.")


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
  """Turns a failed cross-host computation (a peer died) into a RestJaxError."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    raise RestJaxError(
        f"a computation across the {jax.process_count()} processes failed on process "
        f"{jax.process_index()} ({str(e).strip().splitlines()[0][:300]}). Another host "
        "probably crashed: read its log, then rerun the same command on every host to "
        "resume.") from None


def exit_now_if_multihost(code: int) -> None:
  """Ends a multi-host process at once with ``code`` after an error (jax.distributed's normal
  shutdown would wait for hosts that are gone); returns in a single-process run."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  if jax_distributed.global_state.client is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access
