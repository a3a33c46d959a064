"""The device mesh. Project convention: 1-D or n-D meshes with `AxisType.Auto` axes;
the batch is sharded over 'data'."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """A mesh from `config.mesh` (axis name -> size, one size may be -1 = the rest).

  The default `{'data': -1}` puts every device on the data axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(mesh_config.items()) if mesh_config is not None else {"data": -1}
  if "data" not in axes:
    raise ValueError(f"config.mesh must have a 'data' axis, got {axes}")
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
  shape = tuple(axes.values())
  return jax.make_mesh(shape, tuple(axes), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
