"""Logit statistics of the GRAM loss: dense (one device), all-gather, and a ring.

Private to `mmjax.align.gram`. Over the valid samples of the global batch, with
logits l_ij = -logit_scale * vol(a_i, tuple_j) (invalid entries excluded), the
loss needs

  row_lse[i]    = logsumexp_j l_ij      (anchor i against all tuples)
  row_sum[i]    = sum_j l_ij            (label smoothing of the rows)
  column_lse[j] = logsumexp_i l_ij      (tuple j against all anchors)
  column_sum[j] = sum_i l_ij            (label smoothing of the columns)

plus, for metrics only (no gradient), the best negative of each row and column.

Every function takes `negatives_gradient`. True: the exact gradient. False: the
row statistics are differentiated with respect to the anchors only (the tuples
held constant) and the column statistics with respect to the tuples only (the
anchors held constant), as when each direction's negatives come from a gather
without gradient (GRAM's reference code); `logit_scale` gets its gradient from
both. The values are the same either way.
"""

import functools

import jax
import jax.numpy as jnp

from mmjax import collectives
from mmjax.align import _util
from mmjax.align._volumes import block_volumes

_sg = jax.lax.stop_gradient


def masked_logits(volumes, logit_scale, valid_rows, valid_columns):
  valid = valid_rows[:, None] & valid_columns[None, :]
  return jnp.where(valid, -logit_scale * volumes, _util.MASKED_LOGIT), valid


def _best_negative(logits, valid, is_positive, axis):
  return jnp.max(jnp.where(valid & ~is_positive, _sg(logits), -jnp.inf),
                 axis=axis)


def _valid_sum(logits, valid, axis):
  return jnp.sum(jnp.where(valid, logits, 0.0), axis=axis)


def _row_and_column_inputs(anchor, basis, tuple_volume, negatives_gradient):
  """(anchor, basis, tuple_volume) for the row and for the column statistics."""
  if negatives_gradient:
    both = (anchor, basis, tuple_volume)
    return both, both
  return ((anchor, _sg(basis), _sg(tuple_volume)),
          (_sg(anchor), basis, tuple_volume))


def dense_stats(anchor, basis, tuple_volume, valid, logit_scale, *,
                negatives_gradient=True):
  """Statistics from the full [B, B] logits on one device. Without the
  negatives' gradient the logits are computed twice, once per direction, with
  equal values (XLA merges the two forward computations)."""
  rows_in, columns_in = _row_and_column_inputs(anchor, basis, tuple_volume,
                                               negatives_gradient)
  is_positive = jnp.eye(anchor.shape[0], dtype=bool)
  row_logits, both_valid = masked_logits(block_volumes(*rows_in), logit_scale,
                                         valid, valid)
  column_logits = row_logits if negatives_gradient else masked_logits(
      block_volumes(*columns_in), logit_scale, valid, valid)[0]
  return (jax.nn.logsumexp(row_logits, axis=1),
          _valid_sum(row_logits, both_valid, 1),
          jax.nn.logsumexp(column_logits, axis=0),
          _valid_sum(column_logits, both_valid, 0),
          _best_negative(row_logits, both_valid, is_positive, axis=1),
          _best_negative(column_logits, both_valid, is_positive, axis=0))


def all_gather_stats(anchor, basis, tuple_volume, valid, logit_scale,
                     axis_name, *, negatives_gradient=True):
  """Statistics with all anchors and all tuple bases gathered on each device.

  Rows: local anchors x all tuples; columns: all anchors x local tuples. Two
  [b, B] logit blocks per device. Without the negatives' gradient, what is
  gathered carries none (GRAM's `concat_all_gather`).
  """
  (anchor_r, basis_r, volume_r), (anchor_c, basis_c, volume_c) = (
      _row_and_column_inputs(anchor, basis, tuple_volume, negatives_gradient))
  b = anchor.shape[0]
  ids = _util.block_ids(jax.lax.axis_index(axis_name), b)
  global_ids = jnp.arange(b * jax.lax.axis_size(axis_name))

  def gather(v, axis=0):
    return collectives.all_gather(v, axis_name, axis=axis)

  all_valid = gather(valid)
  row_logits, row_valid = masked_logits(
      block_volumes(anchor_r, gather(basis_r, axis=1), gather(volume_r)),
      logit_scale, valid, all_valid)
  column_logits, column_valid = masked_logits(
      block_volumes(gather(anchor_c), basis_c, volume_c), logit_scale,
      all_valid, valid)
  row_positive = ids[:, None] == global_ids[None, :]
  return (jax.nn.logsumexp(row_logits, axis=1),
          _valid_sum(row_logits, row_valid, 1),
          jax.nn.logsumexp(column_logits, axis=0),
          _valid_sum(column_logits, column_valid, 0),
          _best_negative(row_logits, row_valid, row_positive, axis=1),
          _best_negative(column_logits, column_valid, row_positive.T, axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_stats(anchor, basis, tuple_volume, valid, logit_scale, axis_name,
                negatives_gradient):
  """Statistics with anchor blocks going round a ring; tuples stay home.

  At each step a device holds its own tuples, one visiting anchor block and
  their [b, b] logits. Column statistics of the local tuples accumulate on the
  device; row statistics of the visiting anchors (running logsumexp and sum,
  best negative) travel with the anchor block and arrive home after the last
  step. The backward pass runs a second ring: the gradient of each anchor block
  travels with it, the gradients of the local bases accumulate at home. Without
  the negatives' gradient, the rows' cotangent goes to the anchors only and the
  columns' to the tuples only (one ring all the same).
  """
  return _ring_stats_fwd(anchor, basis, tuple_volume, valid, logit_scale,
                         axis_name, negatives_gradient)[0]


def _ring_stats_fwd(anchor, basis, tuple_volume, valid, logit_scale,
                    axis_name, negatives_gradient):
  del negatives_gradient  # The values do not depend on it.
  b = anchor.shape[0]
  local_ids = _util.block_ids(jax.lax.axis_index(axis_name), b)

  def step(origin, local, visiting, visiting_acc):
    column_lse, column_sum, column_best = local
    anchor_visiting, valid_visiting = visiting
    row_lse, row_sum, row_best = visiting_acc
    logits, both_valid = masked_logits(
        block_volumes(anchor_visiting, basis, tuple_volume), logit_scale,
        valid_visiting, valid)
    is_positive = _util.block_ids(origin, b)[:, None] == local_ids[None, :]
    column_lse = jnp.logaddexp(column_lse, jax.nn.logsumexp(logits, axis=0))
    column_sum = column_sum + _valid_sum(logits, both_valid, 0)
    column_best = jnp.maximum(
        column_best, _best_negative(logits, both_valid, is_positive, axis=0))
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    row_sum = row_sum + _valid_sum(logits, both_valid, 1)
    row_best = jnp.maximum(
        row_best, _best_negative(logits, both_valid, is_positive, axis=1))
    return (column_lse, column_sum, column_best), (row_lse, row_sum, row_best)

  dtype = anchor.dtype
  empty_lse = jnp.full((b,), _util.MASKED_LOGIT, dtype)
  lowest = jnp.full((b,), -jnp.inf, dtype)
  zeros = jnp.zeros((b,), dtype)
  ((column_lse, column_sum, column_best),
   (row_lse, row_sum, row_best)) = _util.ring_loop(
       step, axis_name, local=(empty_lse, zeros, lowest),
       visiting=(anchor, valid), visiting_acc=(empty_lse, zeros, lowest))
  outputs = (row_lse, row_sum, column_lse, column_sum, row_best, column_best)
  residuals = (anchor, basis, tuple_volume, valid, logit_scale, row_lse,
               column_lse)
  return outputs, residuals


def _ring_stats_bwd(axis_name, negatives_gradient, residuals, cotangents):
  (anchor, basis, tuple_volume, valid, logit_scale, row_lse,
   column_lse) = residuals
  # The best-negative statistics are metrics and carry no gradient.
  (row_lse_cotangent, row_sum_cotangent, column_lse_cotangent,
   column_sum_cotangent) = cotangents[:4]

  def step(origin, local, visiting, visiting_acc):
    del origin  # The gradient does not single out positives.
    d_basis, d_tuple_volume, d_scale = local
    (anchor_visiting, valid_visiting, row_lse_visiting, row_lse_ct,
     row_sum_ct) = visiting
    (d_anchor_visiting,) = visiting_acc
    volumes, volumes_vjp = jax.vjp(block_volumes, anchor_visiting, basis,
                                   tuple_volume)
    logits, both_valid = masked_logits(volumes, logit_scale, valid_visiting,
                                       valid)
    d_rows = jnp.where(both_valid, row_lse_ct[:, None] * jnp.exp(
        logits - row_lse_visiting[:, None]) + row_sum_ct[:, None], 0.0)
    d_columns = jnp.where(both_valid, column_lse_cotangent[None, :] * jnp.exp(
        logits - column_lse[None, :]) + column_sum_cotangent[None, :], 0.0)
    d_scale = d_scale - jnp.sum((d_rows + d_columns) * volumes)
    if negatives_gradient:
      d_anchor, d_basis_step, d_tuple_volume_step = volumes_vjp(
          -logit_scale * (d_rows + d_columns))
    else:
      d_anchor = volumes_vjp(-logit_scale * d_rows)[0]
      _, d_basis_step, d_tuple_volume_step = volumes_vjp(
          -logit_scale * d_columns)
    return ((d_basis + d_basis_step, d_tuple_volume + d_tuple_volume_step,
             d_scale), (d_anchor_visiting + d_anchor,))

  (d_basis, d_tuple_volume, d_scale), (d_anchor,) = _util.ring_loop(
      step, axis_name,
      local=(jnp.zeros_like(basis), jnp.zeros_like(tuple_volume),
             jnp.zeros_like(logit_scale)),
      visiting=(anchor, valid, row_lse, row_lse_cotangent, row_sum_cotangent),
      visiting_acc=(jnp.zeros_like(anchor),))
  return d_anchor, d_basis, d_tuple_volume, None, d_scale


_ring_stats.defvjp(_ring_stats_fwd, _ring_stats_bwd)


def ring_stats(anchor, basis, tuple_volume, valid, logit_scale, axis_name, *,
               negatives_gradient=True):
  """`_ring_stats` on inputs cast to varying (the ring returns per-device
  values; the cast of replicated inputs transposes to a psum of gradients)."""
  return _ring_stats(*collectives.vary(
      (anchor, basis, tuple_volume, valid, logit_scale), axis_name), axis_name,
                     negatives_gradient)
