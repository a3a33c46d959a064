"""Cross-device sums whose bits do not depend on how devices are split into processes.

A `psum` adds the devices' values in whatever order the backend's all-reduce
picks: one order between the CPU devices of one process, another (a ring, a
tree) across processes over gloo, NCCL or the TPU interconnect. Floating-point
addition is not associative, so the same global batch on 1 process x 8 devices
and on 2 processes x 4 devices gives gradients that differ in their last bits,
and training amplifies the difference (one float32 ulp of the loss within a few
steps, 7.6e-6 after twenty on the default experiment).

Inside `fixed_order()`, the functions here add in device order instead: every
device gathers all the values (a copy, exact on every backend) and sums them
itself, from device 0 up. The result is the same bits on any process layout.
The price is memory and bandwidth: a gathered sum holds n copies of the value,
and the gradient of replicated parameters is reduced that way too (n times the
gradient's size, transiently, on each device). Meant for reproducibility checks
and small models; big runs keep the backend's all-reduce (the default).

Outside `fixed_order()` each function is the `jax.lax` collective of the same
name, so library code calls these and the train step chooses (through the
`deterministic_reductions` config field). The choice is read when a function is
traced, like `jax.default_matmul_precision`.

Used inside `jax.shard_map` with its default `check_vma=True`. `axis` is one mesh axis
or a tuple of them (the train step's batch axes, `mmjax.train.mesh.batch_axes`); over a
tuple the device order is the flat index over those axes, in mesh order.

  psum(x, axis)          sum over devices; invariant result.
  pmean(x, axis)         psum / n.
  all_gather(x, axis)    tiled all_gather; its gradient (a reduce-scatter) summed in
                         device order too.
  vary(tree, axis)       marks replicated values (parameters) as per-device, so that
                         their gradients come out per device, to be `psum`-ed here
                         rather than by autodiff's implicit all-reduce.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

_state = threading.local()


def fixed_order_enabled() -> bool:
  """Whether the functions of this module currently sum in device order."""
  return getattr(_state, "enabled", False)


@contextlib.contextmanager
def fixed_order(enabled: bool = True):
  """Within this context (at trace time), sums over devices go in device order."""
  previous = fixed_order_enabled()
  _state.enabled = bool(enabled)
  try:
    yield
  finally:
    _state.enabled = previous


def _axes(axis_name) -> tuple:
  """`axis_name` (one mesh axis or a tuple of them) as a tuple."""
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_axes(x, axis_name) -> tuple:
  """The axes of `axis_name` over which `x` is typed varying."""
  varying = jax.typeof(x).mat.varying
  return tuple(a for a in _axes(axis_name) if a in varying)


def _is_varying(x, axis_name) -> bool:
  """Whether `x` is varying over every axis of `axis_name`."""
  return len(_varying_axes(x, axis_name)) == len(_axes(axis_name))


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def vary(tree, axis_name):
  """Every leaf of `tree` typed as varying over `axis_name` (no-op where it is).

  Under `shard_map` with `check_vma=True`, values that are the same on every device
  (replicated params, a logit_scale) are typed invariant; loops that carry
  per-device values (the rings of `mmjax.align`) need their inputs varying.
  Autodiff transposes this cast into a `psum` of the cotangents, which is what sums
  the per-device partial gradients of a replicated value: in fixed order, call it on
  the parameters, differentiate with respect to the varying copy and `psum` the
  gradients with this module instead.
  """
  def cast(x):
    missing = tuple(a for a in _axes(axis_name) if a not in _varying_axes(x, axis_name))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def _ordered_sum(stacked):
  """stacked[0] + stacked[1] + ... + stacked[n - 1], in that order."""
  total, _ = jax.lax.scan(lambda acc, x: (acc + x, None), stacked[0], stacked[1:])
  return total


def _fixed_psum_value(x, axis_name):
  """The device-order sum of `x`, typed invariant.

  The sum is the same bits on every device; `pmax` over equal values only
  changes its type (max is exact, whatever its order).
  """
  total = _ordered_sum(jax.lax.all_gather(vary(x, axis_name), axis_name))
  return jax.lax.pmax(total, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fixed_psum(x, axis_name):
  return _fixed_psum_value(x, axis_name)


def _fixed_psum_fwd(x, axis_name):
  varying = _varying_axes(x, axis_name)
  return _fixed_psum_value(x, axis_name), tuple(a in varying for a in _axes(axis_name))


def _fixed_psum_bwd(axis_name, x_varying_flags, cotangent):
  # d(sum_d x_d)/dx_d = 1: each device's cotangent is the output's; an x invariant over
  # some of the axes is counted once per device of those (jax.lax.psum's convention).
  x_varying, size = [], 1
  for a, was_varying in zip(_axes(axis_name), x_varying_flags):
    if was_varying:
      x_varying.append(a)
    else:
      size *= jax.lax.axis_size(a)
  cotangent = cotangent * size if size != 1 else cotangent
  return (vary(cotangent, tuple(x_varying)) if x_varying else cotangent,)


def psum(tree, axis_name):
  """`jax.lax.psum`; in fixed order, the device-order sum (every leaf)."""
  if not fixed_order_enabled():
    return jax.lax.psum(tree, axis_name)
  # Integer sums are exact in any order.
  return jax.tree.map(
      lambda x: _fixed_psum(x, axis_name) if _is_float(x) else jax.lax.psum(x, axis_name),
      tree)


def pmean(tree, axis_name):
  """`jax.lax.pmean`; in fixed order, the device-order sum divided by n."""
  if not fixed_order_enabled():
    return jax.lax.pmean(tree, axis_name)
  n = jax.lax.axis_size(axis_name)
  return jax.tree.map(lambda x: x / n, psum(tree, axis_name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fixed_all_gather(x, axis_name, axis):
  return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def _fixed_all_gather_fwd(x, axis_name, axis):
  return _fixed_all_gather(x, axis_name, axis), None


def _fixed_all_gather_bwd(axis_name, axis, _, cotangent):
  # The transpose of a tiled all_gather is a reduce-scatter: every device's
  # cotangent of the whole gathered array, summed, and this device's block kept.
  total = _ordered_sum(jax.lax.all_gather(cotangent, axis_name))
  size = total.shape[axis] // jax.lax.axis_size(axis_name)
  start = jax.lax.axis_index(axis_name) * size
  return (jax.lax.dynamic_slice_in_dim(total, start, size, axis=axis),)


_fixed_psum.defvjp(_fixed_psum_fwd, _fixed_psum_bwd)
_fixed_all_gather.defvjp(_fixed_all_gather_fwd, _fixed_all_gather_bwd)


def all_gather(x, axis_name, *, axis: int = 0):
  """Tiled `jax.lax.all_gather` of a varying `x` along `axis`; in fixed order, its
  gradient sums the devices' cotangents in device order."""
  if not fixed_order_enabled() or not _is_float(x):
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)
  return _fixed_all_gather(vary(x, axis_name), axis_name, axis)
