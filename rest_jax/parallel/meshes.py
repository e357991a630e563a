"""Mesh configuration: ICI x DCN mesh sizes and named logical-axis rule sets.

A mesh axis (data, fsdp, tensor) has an ICI part (devices within one slice / host group, fast
links) and a DCN part (across slices, slow links); the mesh axis size is their product. Devices
are grouped into granules (TPU slices by ``slice_index``; otherwise processes) and arranged with
``jax.experimental.mesh_utils.create_hybrid_device_mesh`` so that DCN parts span granules.

Rule sets map logical axes to mesh axes; each has a training and a sampling variant:

* ``"data"``: pure data parallelism; the batch is split over every mesh axis, weights replicated.
* ``"fsdp"``: ZeRO-3 style; batch over (data, fsdp), weights split over fsdp on their embed
  axis (gathered once per Grow step for sampling: the sampling variant keeps them unsplit).
* ``"tensor"``: Megatron style; batch over (data, fsdp), heads / mlp / vocab over tensor.
* ``"2d"``: fsdp and tensor together (the default, the rules rest_jax always used).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rest_jax.errors import RestJaxError
from rest_jax.parallel.layout import MESH_AXES, SAMPLING_RULES, TRAIN_RULES, Layout, Rules


def _without(rules: Rules, drop: dict[str, Any]) -> Rules:
  return tuple((name, drop.get(name, axes)) for name, axes in rules)


_NO_TENSOR = {"vocab": None, "mlp": None, "heads": None, "kv_heads": None, "cache_heads": None}
_ALL_BATCH = {"batch": ("data", "fsdp", "tensor"), "cache_batch": ("data", "fsdp", "tensor")}

# name -> (training rules, sampling rules)
RULE_SETS: dict[str, tuple[Rules, Rules]] = {
    "2d": (TRAIN_RULES, SAMPLING_RULES),
    "fsdp": (_without(TRAIN_RULES, _NO_TENSOR), _without(SAMPLING_RULES, _NO_TENSOR)),
    "tensor": (_without(TRAIN_RULES, {"embed": None}), _without(SAMPLING_RULES, {})),
    "data": (_without(TRAIN_RULES, {**_NO_TENSOR, **_ALL_BATCH, "embed": None}),
             _without(SAMPLING_RULES, {**_NO_TENSOR, **_ALL_BATCH})),
}


def rule_set(name: str) -> tuple[Rules, Rules]:
  """The (training, sampling) rules of a named rule set."""
  if name not in RULE_SETS:
    raise RestJaxError(f"unknown mesh rule set {name!r}; MeshConfig.rules must be one of "
                       f"{sorted(RULE_SETS)}.")
  return RULE_SETS[name]


def resolve_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces one -1 in ``sizes`` by "the rest" of ``total``; checks the product is ``total``."""
  sizes = tuple(int(s) for s in sizes)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise RestJaxError(f"{what} sizes {dict(zip(MESH_AXES, sizes))}: each must be >= 1, and at "
                       "most one may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if total % known:
    raise RestJaxError(f"{what} sizes {dict(zip(MESH_AXES, sizes))} do not divide the {total} "
                       f"{'granules' if what == 'DCN' else 'devices'} available; choose sizes "
                       f"whose product is {total} (or use -1 for one of them).")
  sizes = tuple(total // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != total:
    raise RestJaxError(f"{what} sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} of "
                       f"the {total} available; set one size to -1.")
  return sizes


def granule_key(device: Any) -> int:
  """A device's granule: its TPU slice, else its process."""
  index = getattr(device, "slice_index", None) if _is_tpu(device) else None
  return int(device.process_index if index is None else index)


def _is_tpu(device: Any) -> bool:
  return getattr(device, "platform", "") == "tpu"


def device_grid(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any], *,
                key: Callable[[Any], int] = granule_key) -> np.ndarray:
  """Devices arranged `[data, fsdp, tensor]`; each axis is DCN-major, ICI-minor.

  Args:
    ici: per-axis sizes within a granule (one may be -1).
    dcn: per-axis sizes across granules (one may be -1).
    devices: every device of the job.
    key: the granule of a device.
  Returns:
    an object array of shape ``[dcn[i] * ici[i] for i in 0..2]``.
  """
  groups: dict[int, list[Any]] = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  per = {len(g) for g in groups.values()}
  if len(per) != 1:
    raise RestJaxError(f"granules (slices or processes) hold different numbers of devices "
                       f"{sorted(per)}; every host must contribute the same number.")
  if all(int(s) == 1 for s in dcn):  # No DCN split: one flat mesh over every device.
    return np.asarray(list(devices), dtype=object).reshape(
        resolve_sizes(ici, len(devices), "ICI"))
  dcn = resolve_sizes(dcn, len(groups), "DCN")
  ici = resolve_sizes(ici, per.pop(), "ICI")
  if key is granule_key:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices,
        process_is_granule=not _is_tpu(devices[0]) or devices[0].slice_index is None,
        allow_split_physical_axes=True)
  # Custom granules (tests): create_hybrid_device_mesh's arrangement, without TPU topology.
  blocks = [np.asarray(groups[k], dtype=object).reshape(ici) for k in sorted(groups)]
  grid = np.empty(tuple(dcn) + tuple(ici), dtype=object)
  for i, index in enumerate(np.ndindex(*dcn)):
    grid[index] = blocks[i]
  return grid.transpose(0, 3, 1, 4, 2, 5).reshape([a * b for a, b in zip(dcn, ici)])


def make_hybrid_mesh(ici: Sequence[int], dcn: Sequence[int] = (1, 1, 1),
                     devices: Sequence[jax.Device] | None = None, *,
                     key: Callable[[Any], int] = granule_key) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes from ICI and DCN sizes (``key``: a device's
  granule, see ``device_grid``)."""
  devices = list(jax.devices() if devices is None else devices)
  grid = device_grid(ici, dcn, devices, key=key)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def layout_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None, *,
                       key: Callable[[Any], int] = granule_key) -> Layout:
  """The Layout of a ``config.MeshConfig``: its ICI / DCN sizes and its named rule set.

  The one way from mesh sizes to a Layout. ``devices``: default every device of the job;
  ``key``: a device's granule (default its TPU slice, else its process), which the DCN sizes
  split across.
  """
  c = mesh_config
  train, sampling = rule_set(c.rules)
  mesh = make_hybrid_mesh((c.data, c.fsdp, c.tensor), (c.dcn_data, c.dcn_fsdp, c.dcn_tensor),
                          devices, key=key)
  return Layout(mesh, rules=train, sampling_rules=sampling)


def host_local_layout(layout: Layout) -> Layout:
  """``layout`` restricted to this process's own devices (``jax.local_devices()``).

  For work that each host does on its own rows, such as scoring its Grow samples with a learned
  reward model: a jit whose arrays live on a host-local mesh involves no other process, so hosts
  may call it different numbers of times, with different rows. The local mesh keeps the rules
  and, per axis, the largest part of the global size that the local devices allow: tensor =
  gcd(global tensor, local devices), fsdp = gcd(global fsdp, the rest), data = the rest. With one
  process, ``layout`` itself is returned (every device is local).
  """
  if jax.process_count() == 1:
    return layout
  local = jax.local_devices()
  shape = dict(layout.mesh.shape)
  tensor = math.gcd(shape["tensor"], len(local))
  fsdp = math.gcd(shape["fsdp"], len(local) // tensor)
  grid = np.asarray(local, dtype=object).reshape(len(local) // (tensor * fsdp), fsdp, tensor)
  mesh = Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Layout(mesh, rules=layout.rules, sampling_rules=layout.sampling_rules)
