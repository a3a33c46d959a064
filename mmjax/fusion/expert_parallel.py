"""Expert parallelism's bookkeeping for `moe` and `flexmoe` fusion: which params are
expert-stacked, and how many devices share the experts (the layer itself is
`mmjax.fusion.moe.SparseMoE`; the dispatch is described there)."""
from __future__ import annotations

import re

import jax
from jax.sharding import PartitionSpec as P

# The expert-stacked params of a SparseMoE (leading axis: experts), by their
# '/'-joined path: the sharding rule puts their leading axis on the expert axis.
EXPERT_PARAM_PATTERN = r"(?:.*/)?moe_\d+/(?:w_in|b_in|w_out|b_out)"


def _check_divides(num_experts: int, size: int, expert_axis: str) -> None:
  if num_experts % size:
    raise ValueError(
        f"num_experts={num_experts} is not divisible by the size {size} of mesh "
        f"axis {expert_axis!r} (fusion.expert_axis): each device must hold the "
        f"same number of experts")


def expert_parallel_size(num_experts: int, expert_axis: str | None) -> int:
  """Size n of `expert_axis` where it is bound (inside `shard_map`), else 1.

  Raises:
    ValueError: when n does not divide num_experts (names the axis).
  """
  if expert_axis is None:
    return 1
  try:
    size = jax.lax.axis_size(expert_axis)
  except NameError:  # not inside a shard_map over that axis: all experts here
    return 1
  _check_divides(num_experts, size, expert_axis)
  return size


def expert_param_specs(params, expert_axis: str = "expert"):
  """A tree like `params` of PartitionSpecs: P(expert_axis) (leading axis over the
  experts) for the expert-stacked params (`EXPERT_PARAM_PATTERN`), P() for the rest."""
  pattern = re.compile(EXPERT_PARAM_PATTERN)

  def spec(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return P(expert_axis) if pattern.fullmatch(name) else P()

  return jax.tree_util.tree_map_with_path(spec, params)


def check_expert_mesh(num_experts: int, expert_axis: str | None, mesh_axes) -> None:
  """Raises ValueError unless mesh axis `expert_axis` (when set) exists in
  `mesh_axes` (axis name -> size) and its size divides num_experts."""
  if expert_axis is None:
    return
  axes = dict(mesh_axes)
  if expert_axis not in axes:
    raise ValueError(f"fusion.expert_axis={expert_axis!r} is not an axis of the mesh "
                     f"{axes}")
  _check_divides(num_experts, axes[expert_axis], expert_axis)
