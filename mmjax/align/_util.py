"""Helpers shared by the alignment losses: input checks and ring collectives.

Everything here is private to `mmjax.align`. The checks raise `ValueError`
naming the argument at fault. Checks that need values (NaN/Inf, masks that
leave a sample empty) only run when the input is concrete, i.e. on eager calls;
under `jax.jit` or `jax.shard_map` the values are abstract and only shapes are
checked.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import collectives
from mmjax.array_util import is_concrete  # noqa: F401  (used here and in gram)

# Stands for an excluded logit. Finite, so that logsumexp over a fully excluded
# row and its softmax stay free of inf - inf = NaN.
MASKED_LOGIT = -1e30


def compute_dtype(*arrays) -> jnp.dtype:
  """The dtype losses compute in: the inputs' dtype, at least float32."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def check_embedding(name: str, x) -> None:
  """Checks that `x` is a floating [B, D] array; `name` goes in the error."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array of shape [B, D], got {type(x)}.")
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [B, D], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}.")


def check_finite(name: str, x) -> None:
  """Raises if a concrete `x` holds NaN or Inf; a no-op on tracers."""
  if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name} contains NaN or Inf values.")


def check_same_shape(named: dict[str, Any], what: str) -> None:
  """Checks that the arrays in `named` share one shape; `what` names them."""
  shapes = {name: tuple(x.shape) for name, x in named.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(
        f"{what} must all have the same shape [B, D] (same batch size and "
        f"width), got {shapes}.")


def as_scalar(name: str, value, dtype) -> jax.Array:
  """Converts a scalar argument (e.g. logit_scale) to a 0-d array of `dtype`."""
  value = jnp.asarray(value)
  if value.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
  if not (jnp.issubdtype(value.dtype, jnp.floating) or
          jnp.issubdtype(value.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a real number, got dtype {value.dtype}.")
  check_finite(name, value)
  return value.astype(dtype)


def check_label_smoothing(label_smoothing) -> float:
  """Checks 0 <= label_smoothing < 1 and returns it as a Python float."""
  if isinstance(label_smoothing, jax.core.Tracer):
    raise ValueError(
        "label_smoothing must be a Python float, not a traced value.")
  value = float(label_smoothing)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {value}.")
  return value


def ring_shift(tree, axis_name):
  """Sends every leaf of `tree` from device i to device i + 1 (mod n)."""
  n = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(tree, axis_name, [(i, (i + 1) % n) for i in range(n)])


def ring_loop(step: Callable, axis_name, local, visiting, visiting_acc):
  """Passes each device's block once around the ring of devices.

  At step k = 0 .. n-1, device d holds the block that started on device
  (d - k) mod n (its `origin`) and calls

    local, visiting_acc = step(origin, local, visiting, visiting_acc)

  `local` stays on the device (e.g. accumulators of its own samples),
  `visiting` is the travelling block itself (read only) and `visiting_acc`
  travels with it (accumulators of the visiting samples, e.g. their running
  logsumexp or gradient). Every step ends with one hop; the n-th brings each
  block and its accumulators back to the device it started on. (The block's
  own last hop is redundant, one transfer in n, but a peeled last step
  outside the loop would double the step's temporary buffers.) A device thus
  holds its own data, one visiting block and their accumulators: memory does
  not grow with n.

  Args:
    step: the per-step function described above; `origin` is a traced int32.
    axis_name: the mesh axis of the ring (inside `shard_map`).
    local, visiting, visiting_acc: pytrees of arrays.

  Returns:
    (local, visiting_acc) after n steps; `visiting_acc` is this device's own
    block's accumulator, having visited every device.
  """
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  local, visiting, visiting_acc = collectives.vary(
      (local, visiting, visiting_acc), axis_name)

  def body(k, carry):
    local, visiting, visiting_acc = carry
    local, visiting_acc = step((me - k) % n, local, visiting, visiting_acc)
    visiting, visiting_acc = ring_shift((visiting, visiting_acc), axis_name)
    return local, visiting, visiting_acc

  local, visiting, visiting_acc = jax.lax.fori_loop(
      0, n, body, (local, visiting, visiting_acc))
  return local, visiting_acc


def block_ids(origin, block_size: int) -> jax.Array:
  """Global batch indices [block_size] of the block that started on `origin`."""
  return origin * block_size + jnp.arange(block_size)


def smoothed_cross_entropy(logits, positive_logit, label_smoothing: float):
  """Row-wise softmax cross-entropy with label smoothing.

  The target of row i puts 1 - eps on its positive and eps / N on each of the
  N columns (optax.smooth_labels convention), so the loss is
  logsumexp_j(l_ij) - (1 - eps) * l_i,pos - eps * mean_j(l_ij).

  Args:
    logits: [R, N] logits.
    positive_logit: [R] the logit of each row's positive.
    label_smoothing: eps in [0, 1).

  Returns:
    [R] per-row losses.
  """
  loss = (jax.nn.logsumexp(logits, axis=1) -
          (1.0 - label_smoothing) * positive_logit)
  if label_smoothing:
    loss = loss - label_smoothing * jnp.mean(logits, axis=1)
  return loss
