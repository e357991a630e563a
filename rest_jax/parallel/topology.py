"""Topology names (``v5e:16x16``, ``h100:4x8``) and HBM per chip; no jax import, so the CLI can
size the CPU device count before jax starts."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from rest_jax.errors import RestJaxError

GIB = 1024**3

# HBM per chip (GiB), by the generation named in the topology.
HBM_GIB: dict[str, float] = {
    "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "h100": 80, "h200": 141, "a100-40": 40, "a100-80": 80,
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed topology name: ``chip:AxB[xC]``; ``devices`` is the number of chips / GPUs."""

  name: str
  chip: str
  dims: tuple[int, ...]

  @property
  def devices(self) -> int:
    return math.prod(self.dims)

  @property
  def is_tpu(self) -> bool:
    return self.chip in TPU_CHIPS

  @property
  def hbm_bytes(self) -> int:
    return int(HBM_GIB[self.chip] * GIB)


def parse_topology(name: str) -> Topology:
  """``"v5e:16x16"`` -> Topology(chip="v5e", dims=(16, 16)); GPUs: ``"h100:4x8"`` (nodes x
  GPUs per node)."""
  m = re.fullmatch(r"([a-z0-9-]+):(\d+(?:x\d+)*)", name.strip().lower())
  if m is None or m.group(1) not in HBM_GIB:
    raise RestJaxError(f"topology {name!r} is not CHIP:AxB[xC] with CHIP one of "
                       f"{sorted(HBM_GIB)}; e.g. v5e:16x16, v5p:4x4x4, h100:4x8 "
                       "(GPU meshes: nodes x GPUs per node).")
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if min(dims) < 1:
    raise RestJaxError(f"topology {name!r} has a zero dimension; every size must be >= 1.")
  return Topology(name=name.strip().lower(), chip=m.group(1), dims=dims)


def needed_cpu_devices(topologies: Sequence[str]) -> int:
  """CPU devices a process needs to compile for these topologies (0 when all are TPU)."""
  return max([0] + [t.devices for t in map(parse_topology, topologies) if not t.is_tpu])
