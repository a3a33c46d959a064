"""The device mesh: up to three named axes, every one of them a batch axis.

  data    replicas: each device on it holds the whole (gathered) model.
  fsdp    parameters and optimizer state are sharded over it (`mmjax.train.sharding`)
          and all-gathered for the forward pass; the batch is split over it too.
  expert  the experts of `moe` / `flexmoe` fusion are sharded over it (their params
          carry P('expert', ...)); the batch is split over it as well (GShard, V-MoE).

The batch is split over every axis of the mesh (`batch_axes`), so the objectives'
`axis_name` is that tuple and an alignment loss sees the negatives of the whole global
batch whatever the layout. Axes use `AxisType.Auto`; the mesh lays them out in the
order above (data outermost), so that the flat device index of a batch block is the
same on `data=8` and on `data=1, fsdp=8`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert")
DATA, FSDP, EXPERT = AXES


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """A mesh from `config.mesh` (axis name -> size, one size may be -1 = the rest).

  The axes are any of `AXES` (an absent one is size 1); the default `{'data': -1}` puts
  every device on the data axis. The product of the sizes must be the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(mesh_config.items()) if mesh_config is not None else {DATA: -1}
  unknown = sorted(set(axes) - set(AXES))
  if unknown or not axes:
    raise ValueError(f"config.mesh {axes}: the axes are {list(AXES)} (every one splits the "
                     f"batch), got {unknown or 'none'}")
  for name, size in axes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"config.mesh.{name} must be a positive int or -1 (the rest of the "
                       f"devices), got {size!r}")
  free = [name for name, size in axes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {axes}")
  fixed = int(np.prod([s for s in axes.values() if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh {axes}: {len(devices)} devices are not divisible by {fixed}")
    axes[free[0]] = len(devices) // fixed
  if int(np.prod(list(axes.values()))) != len(devices):
    raise ValueError(f"config.mesh {axes} needs {int(np.prod(list(axes.values())))} devices, "
                     f"there are {len(devices)}")
  names = tuple(a for a in AXES if a in axes)
  shape = tuple(axes[a] for a in names)
  return jax.make_mesh(shape, names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (all of them), in mesh order: the
  objectives' `axis_name` and the data's `PartitionSpec`."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh) -> NamedSharding:
  """The global batch's sharding: rows split over every mesh axis."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def axis_size(mesh, name: str) -> int:
  """The size of mesh axis `name` (1 when the mesh has no such axis)."""
  return int(dict(mesh.shape).get(name, 1))


def describe(mesh) -> str:
  """'data=2 x fsdp=4', for messages."""
  return " x ".join(f"{a}={s}" for a, s in dict(mesh.shape).items())


def eval_mesh(mesh) -> Mesh:
  """A 1-D 'data' mesh over the same devices in the same order: evaluators place and
  embed their batches on it (the rows land on the devices they would on `mesh`)."""
  if tuple(mesh.axis_names) == (DATA,):
    return mesh
  return Mesh(np.asarray(mesh.devices).reshape(-1), (DATA,),
              axis_types=(jax.sharding.AxisType.Auto,))
