"""Ahead-of-time compile check: does a run's Grow and Improve step fit a pod it has not got?

``check(config, "v5e:16x16")`` compiles the real jitted steps of a run for a topology, with
abstract (never materialised) params and batches sharded by the run's Layout, and reads each
executable's per-device memory from ``compiled.memory_analysis()``:

* Grow: ``Sampler.lowerable_generate`` (prefill + N-sample decode loop, sampling rules).
* Improve: the run's own Improve step: ``losses.make_loss(config.improve.train)``, the pre-pass
  that loss needs (``improve.extras.build_extras``: frozen BC params, the starting policy's
  log-probs, the value network for bvmpo / oac; its own row, ``improve_extras``), and
  ``Trainer.jitted_step`` (forward, backward, AdamW update, donated TrainState) on the batch
  with the pre-pass's fields.

The mesh is the run's own Layout (``meshes.layout_from_config(config.mesh)``: ICI and DCN sizes
and the rule set). DCN sizes above 1 need granules: a GPU topology ``h100:NxG`` has N nodes of
G GPUs, each node a granule; a TPU topology is one slice, and DCN sizes above 1 ask libtpu for
that many slices of it (``num_slices``).

TPU topologies (``v4:2x2x2``, ``v5e:16x16``, ``v5p:4x4x4``, ``v6e:8x8``) come from libtpu's
topology descriptions (``pip install rest_jax[tpu]``): XLA:TPU compiles for the real chips on
any machine. GPU meshes (``h100:4x8`` = 4 nodes x 8 GPUs) cannot be compiled for without the
CUDA plugin and a GPU; they are compiled for a CPU-device mesh of the same shape instead, and
the memory is reported as an *estimate* (CPU XLA fuses and schedules differently).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax import models

from rest_jax.improve import losses
from rest_jax.improve import value
from rest_jax.config import MeshConfig, RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.extras import build_extras
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.pipeline import build
from rest_jax.parallel import meshes
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.topology import GIB, HBM_GIB, Topology, parse_topology


def _tpu_devices(topo: Topology, num_slices: int) -> list[Any]:
  """libtpu's compile-only devices of ``num_slices`` slices of ``topo``."""
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    # No TPU here: skip libtpu's lockfile and its worker discovery (compilation only).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **kwargs)
  except TypeError as e:
    raise RestJaxError(f"this jax cannot describe {num_slices} slices of {topo.name!r} "
                       f"({' '.join(str(e).split())[:200]}); compile-check a mesh with every "
                       "MeshConfig.dcn_* size 1, or upgrade jax.") from e
  except (RuntimeError, ValueError) as e:
    raise RestJaxError(f"cannot describe TPU topology {topo.name!r}: "
                       f"{' '.join(str(e).split())[:300]}. Install libtpu for this jax "
                       "(pip install -e '.[tpu]') and check the topology name (e.g. v5e:4x4, "
                       "v4:2x2x2).") from e
  devices = list(desc.devices)
  if len(devices) != topo.devices * num_slices:
    raise RestJaxError(f"libtpu described {len(devices)} devices for {num_slices} slices of "
                       f"{topo.name!r}, not {topo.devices * num_slices}; set every "
                       "MeshConfig.dcn_* size to 1 to compile-check one slice.")
  return devices


def topology_devices(topo: Topology, *, num_slices: int = 1) -> tuple[list[Any], str]:
  """Devices to compile for, and how ("tpu": libtpu's real chips; "cpu-estimate").

  ``num_slices``: TPU slices of ``topo`` (a GPU topology's nodes are in its name).
  """
  if topo.is_tpu:
    return _tpu_devices(topo, num_slices), "tpu"
  cpus = jax.devices("cpu")
  if len(cpus) < topo.devices:
    raise RestJaxError(
        f"GPU topology {topo.name!r} is compiled for a CPU mesh of {topo.devices} devices (an "
        f"estimate; there is no CUDA compiler here) but jax has {len(cpus)} CPU devices. Start "
        f"with XLA_FLAGS=--xla_force_host_platform_device_count={topo.devices} (the "
        "`rest-jax compile-check` command sets it for you).")
  return cpus[:topo.devices], "cpu-estimate"


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device memory of one compiled step, in bytes (from ``memory_analysis()``)."""

  step: str
  arguments: int
  temporaries: int
  outputs: int
  aliased: int  # Output bytes that reuse donated argument buffers.
  code: int

  @property
  def total(self) -> int:
    """Peak estimate: live arguments + temporaries + outputs not aliased to arguments."""
    return self.arguments + self.temporaries + self.outputs - self.aliased


@dataclasses.dataclass(frozen=True)
class CheckResult:
  topology: Topology
  mode: str  # "tpu" or "cpu-estimate".
  mesh_shape: dict[str, int]
  num_params: int
  steps: tuple[StepMemory, ...]
  knobs: dict[str, str] = dataclasses.field(default_factory=dict)  # Step -> what to turn.

  def fits(self, step: StepMemory) -> bool:
    return step.total <= self.topology.hbm_bytes


def knobs(config: RunConfig) -> dict[str, str]:
  """What to turn, per step, when it does not fit (with the config's current values)."""
  model, mesh, s = config.model, config.mesh, config.grow.sampling
  train = (f"ModelConfig.remat_policy (now {model.remat_policy!r}; 'full' keeps only each "
           f"layer's input), MeshConfig.fsdp (now {mesh.fsdp}; splits weights and Adam moments "
           f"further), improve TrainConfig.batch_size (now {config.improve.train.batch_size})")
  return {
      "grow_sample": (f"SamplingConfig.batch_size (now {s.batch_size}) or num_samples (now "
                      f"{s.num_samples}), MeshConfig.tensor (now {mesh.tensor}; decoding splits "
                      "the weights over tensor only), or bfloat16 params (ModelConfig."
                      f"param_dtype, now {model.param_dtype!r})"),
      "improve_train": train, "improve_extras": train}


def _memory(step: str, compiled: Any) -> StepMemory:
  m = compiled.memory_analysis()
  if m is None:
    raise RestJaxError(f"the {step} executable reports no memory analysis on this backend.")
  return StepMemory(step=step, arguments=int(m.argument_size_in_bytes),
                    temporaries=int(m.temp_size_in_bytes), outputs=int(m.output_size_in_bytes),
                    aliased=int(m.alias_size_in_bytes),
                    code=int(m.generated_code_size_in_bytes))


def _abstract_batch(layout: Layout, batch: int, input_len: int,
                    target_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch as ``data.train_batches`` gives it, abstract and batch-sharded."""
  shapes = {"inputs": ((batch, input_len), jnp.int32), "targets": ((batch, target_len), jnp.int32),
            "reward": ((batch,), jnp.float32),
            "behaviour_logprobs": ((batch, target_len), jnp.float32),
            "is_original": ((batch,), jnp.int32), "example_id": ((batch,), jnp.int32)}
  sharding = layout.sharding(("batch",))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def gpu_nodes(topo: Topology) -> int:
  """The nodes of a GPU topology: N of ``h100:NxG`` (one node for ``h100:G``)."""
  return topo.dims[0] if len(topo.dims) > 1 else 1


def _devices(mesh: MeshConfig, topo: Topology) -> tuple[list[Any], Callable[[Any], int], str]:
  """The topology's devices, their granules (DCN sizes split slices or GPU nodes) and mode."""
  dcn = (mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor)
  num_slices = math.prod(s for s in dcn if s != -1) if topo.is_tpu else 1
  devices, mode = topology_devices(topo, num_slices=num_slices)
  key: Callable[[Any], int] = meshes.granule_key
  if not topo.is_tpu:  # Node n holds CPU devices n*G .. (n+1)*G - 1.
    per_node = len(devices) // gpu_nodes(topo)
    node = {d.id: i // per_node for i, d in enumerate(devices)}
    key = lambda d: node[d.id]
  return devices, key, mode


def _improve_steps(parts: build.Parts) -> list[StepMemory]:
  """The run's Improve step, abstractly: its loss, the loss's pre-pass and the train step."""
  config, layout, graphdef, params = parts.config, parts.layout, parts.graphdef, \
      parts.abstract_params
  train = config.improve.train
  loss = parts.improve_loss
  batch = _abstract_batch(layout, train.batch_size, config.input_len, config.target_len)
  frozen = layout.abstract_state(params)  # BC and starting policy: training shardings.
  kw: dict[str, Any] = {}
  if losses.NEEDS_VALUES in loss.needs:
    net = value.ValueNet(config.model, layout, seed=config.seed)  # Abstract until init().
    kw = {"value_net": net, "value_params": net.abstract_params,
          "discount": config.value.discount}
  extras = build_extras(loss.needs, layout=layout, policy_graphdef=graphdef, bc_params=frozen,
                        start_params=frozen, **kw)
  steps = []
  if extras is not None:
    steps.append(_memory("improve_extras", extras.lower(batch).compile()))
    sharding = layout.sharding(("batch",))
    batch = {**batch, **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                         for k, v in extras.output_shapes(batch).items()}}
  trainer = Trainer(graphdef, layout, loss, make_optimizer(train), extras=extras)
  state = trainer.abstract_state(params)
  steps.append(_memory("improve_train",
                       trainer.jitted_step(params).lower(state, batch).compile()))
  return steps


def check(config: RunConfig, topology: str | Topology) -> CheckResult:
  """Compiles the run's Grow sampling step and Improve step for ``topology``.

  Params are abstract (``models.abstract_model``): no weights are allocated, whatever the size.
  The mesh is the run's Layout (``config.mesh``: sizes, DCN sizes, rule set). The Grow step uses
  ``config.grow.sampling`` (batch padded to the batch shards as in a run); the Improve step
  uses ``config.improve.train`` (loss and its pre-pass, optimizer, global batch size).

  Raises:
    RestJaxError: a topology, mesh, loss or batch size that does not fit (cause and fix).
  """
  topo = parse_topology(topology) if isinstance(topology, str) else topology
  devices, granule, mode = _devices(config.mesh, topo)
  parts = build.resolve(config, devices=devices, granule=granule)  # Exactly what a run builds.
  fn, args = parts.grow_sampler.lowerable_generate(
      parts.abstract_params, batch=config.grow.sampling.batch_size, input_len=config.input_len)
  grow = _memory("grow_sample", fn.lower(*args).compile())
  improve = _improve_steps(parts)
  return CheckResult(topology=topo, mode=mode, mesh_shape=dict(parts.layout.mesh.shape),
                     num_params=models.count_params(nnx.merge(parts.graphdef,
                                                              parts.abstract_params)),
                     steps=(grow, *improve), knobs=knobs(config))


def _gib(n: int) -> str:
  return f"{n / GIB:.3f}"


def format_result(result: CheckResult) -> str:
  """The printed report: one row per step, per-device GiB against the chip's HBM."""
  topo = result.topology
  mode = ("compiled by XLA:TPU for the real chips" if result.mode == "tpu" else
          "ESTIMATE: compiled for a CPU mesh of the same shape (no CUDA compiler here)")
  mesh = " x ".join(f"{k}={v}" for k, v in result.mesh_shape.items())
  head = (f"{'step':14} {'args':>8} {'temps':>8} {'outputs':>8} {'aliased':>8} {'total':>8} "
          f"{'HBM':>7} {'fits':>5}")
  devices = math.prod(result.mesh_shape.values())
  lines = [f"topology {topo.name}: {devices} devices, {mode}",
           f"mesh {mesh}; model {result.num_params:,} params; per-device GiB", head,
           "-" * len(head)]
  for s in result.steps:
    lines.append(f"{s.step:14} {_gib(s.arguments):>8} {_gib(s.temporaries):>8} "
                 f"{_gib(s.outputs):>8} {_gib(s.aliased):>8} {_gib(s.total):>8} "
                 f"{HBM_GIB[topo.chip]:>7g} {'yes' if result.fits(s) else 'NO':>5}")
  for s in result.steps:
    if not result.fits(s):
      over = (s.total - topo.hbm_bytes) / GIB
      lines.append(f"{s.step} does not fit: {_gib(s.total)} GiB per device, {over:.3f} GiB over "
                   f"the {HBM_GIB[topo.chip]:g} GiB of a {topo.chip} chip. Turn "
                   f"{result.knobs.get(s.step, 'the batch size or the mesh')}.")
  return "\n".join(lines)
