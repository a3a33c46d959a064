"""Gramian volume alignment (GRAM, Cicchetti et al., 2025).

The volume of the parallelotope spanned by an anchor embedding a and the K
embeddings o_1..o_K of the other modalities of a sample is sqrt(det G), G the
(K+1)x(K+1) Gram matrix of (a, o_1, .., o_K). Aligned modalities span a small
volume. GRAM uses -volume * logit_scale as the logit between anchor i and the
tuple of sample j, in a symmetric softmax cross-entropy.

Volumes are not computed from B1*B2 determinants. With the orthonormal basis
q_j1..q_jK of tuple j (modified Gram-Schmidt, once per tuple),

  vol(a_i, tuple_j) = vol(tuple_j) * dist(a_i, span(tuple_j)),
  dist^2 = |a_i|^2 - sum_k <a_i, q_jk>^2,

which costs K matmuls of [B1, D] x [D, B2] and O(B1 B2 K) memory.

Multi-device convention: as in `mmjax.align.contrastive` (every device returns
the global loss; autodiff, or the ring's own VJP, gives each device the
gradient of the global loss w.r.t. its embeddings; `pmean` over devices of
param grads taken inside `shard_map` is the global-batch gradient).
"""

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import collectives
from mmjax.align import _util


def _tiny(dtype) -> float:
  """Squared norms below tiny * reference count as zero (rounding noise)."""
  return float(16 * jnp.finfo(dtype).eps) ** 2


def _safe_sqrt(squared, is_positive):
  """sqrt(squared) where is_positive, else 0; finite gradient everywhere.

  The inner where keeps sqrt's infinite slope at 0 out of the gradient of the
  excluded entries (the double-where trick).
  """
  root = jnp.sqrt(jnp.where(is_positive, squared, 1.0))
  return jnp.where(is_positive, root, 0.0)


def orthonormal_tuples(others, present=None):
  """Orthonormal bases and volumes of the tuples (modified Gram-Schmidt).

  Args:
    others: [K, B, D]; tuple j is (others[0, j], .., others[K-1, j]).
    present: optional [B, K] bool; False drops others[k, j] from tuple j.

  Returns:
    basis: [K, B, D]; basis[:, j] holds orthonormal vectors spanning tuple j
      (a zero vector for a dropped or linearly dependent one);
    volume: [B] the K'-volume of tuple j (K' its present vectors), i.e.
      sqrt(det) of their Gram matrix; 0 for a dependent tuple.
  """
  num_others, batch, _ = others.shape
  tiny = _tiny(others.dtype)
  basis = []
  volume = jnp.ones((batch,), others.dtype)
  for k in range(num_others):
    original = others[k]
    residual = original
    for q in basis:
      residual = residual - jnp.sum(residual * q, axis=1, keepdims=True) * q
    squared_norm = jnp.sum(residual * residual, axis=1)
    independent = squared_norm > tiny * jnp.sum(original * original, axis=1)
    if present is not None:
      independent = independent & present[:, k]
    norm = _safe_sqrt(squared_norm, independent)
    safe_norm = jnp.where(independent, norm, 1.0)
    basis.append(jnp.where(independent[:, None], residual / safe_norm[:, None],
                           0.0))
    # A present but dependent vector has norm 0 and makes the volume 0; an
    # absent one leaves the volume alone.
    keeps = True if present is None else present[:, k]
    volume = volume * jnp.where(keeps, norm, 1.0)
  return jnp.stack(basis), volume


def _distance_to_span(squared_anchor, squared_projection):
  """sqrt(|a|^2 - |projection of a on the span|^2), safe at 0.

  Args:
    squared_anchor: |a|^2, broadcastable against squared_projection.
    squared_projection: sum_k <a, q_k>^2 over an orthonormal basis q.

  Returns:
    The distance of a from the span; 0 (with a finite gradient) where rounding
    leaves nothing of |a|^2, e.g. an anchor inside the span.
  """
  squared = squared_anchor - squared_projection
  return _safe_sqrt(squared,
                    squared > _tiny(squared.dtype) * squared_anchor)


def block_volumes(anchor, basis, tuple_volume):
  """[B1, B2] volumes of every anchor with every tuple, from the tuple bases.

  Args:
    anchor: [B1, D].
    basis, tuple_volume: [K, B2, D] and [B2] from `orthonormal_tuples`.
  """
  # One [B1, D] x [D, B2] product per basis vector: K contiguous [B1, B2]
  # blocks fuse into one elementwise pass (faster than one [B1, B2 K] product
  # reduced over a strided K axis).
  squared_projection = 0.0
  for basis_k in basis:
    projection = anchor @ basis_k.T
    squared_projection = squared_projection + projection * projection
  squared_anchor = jnp.sum(anchor * anchor, axis=1)[:, None]
  return tuple_volume[None, :] * _distance_to_span(squared_anchor,
                                                   squared_projection)


def positive_volumes(anchor, basis, tuple_volume):
  """[B] volume of anchor[j] with tuple j (the diagonal of block_volumes)."""
  projection = jnp.einsum("bd,kbd->kb", anchor, basis)
  return tuple_volume * _distance_to_span(
      jnp.sum(anchor * anchor, axis=1), jnp.sum(projection * projection, 0))


def _check_concrete_mask_rows(name, mask):
  """Raises if a concrete [B, K] mask leaves some row with nothing present."""
  if _util.is_concrete(mask):
    empty = np.flatnonzero(~np.any(np.asarray(mask), axis=1))
    if empty.size:
      raise ValueError(
          f"{name} leaves no modality present for sample(s) "
          f"{empty[:10].tolist()}; every sample needs at least one.")


def gram_volume(anchor, others: Sequence[jax.Array], *, mask=None):
  """Volumes of the parallelotopes spanned by anchor[i] and tuple j.

  Args:
    anchor: [B1, D].
    others: sequence of K >= 1 arrays [B2, D]; tuple j is
      (others[0][j], .., others[K-1][j]).
    mask: optional [B2, K] bool; mask[j, k] False drops others[k][j] from
      tuple j, whose volume is then that of the present subset. Each row needs
      at least one True (checked when the mask is concrete).

  Returns:
    [B1, B2] volumes sqrt(det G_ij), G_ij the Gram matrix of anchor[i] and the
    present vectors of tuple j. Values and gradients are finite when a tuple is
    degenerate (volume 0).

  Raises:
    ValueError: K = 0, arrays that are not [B, D] or differ in width, others
      of different shapes, a mask of the wrong shape or dtype; on concrete
      inputs also NaN/Inf values and a mask row with no True.
  """
  _util.check_embedding("anchor", anchor)
  if isinstance(others, (jax.Array, np.ndarray)) or not isinstance(
      others, Sequence):
    raise ValueError("others must be a sequence (list/tuple) of K arrays "
                     f"[B2, D], got {type(others)}.")
  if not others:
    raise ValueError("others is empty: gram_volume needs K >= 1 other "
                     "modalities.")
  for k, other in enumerate(others):
    _util.check_embedding(f"others[{k}]", other)
    if other.shape[1] != anchor.shape[1]:
      raise ValueError(
          f"others[{k}] has width {other.shape[1]}, anchor has width "
          f"{anchor.shape[1]}; they must match.")
  _util.check_same_shape({f"others[{k}]": o for k, o in enumerate(others)},
                         "others")
  b2, num_others = others[0].shape[0], len(others)
  if mask is not None:
    mask = jnp.asarray(mask) if not isinstance(mask, jax.Array) else mask
    if mask.shape != (b2, num_others) or mask.dtype != jnp.bool_:
      raise ValueError(
          f"mask must be a bool array of shape [B2, K] = {(b2, num_others)}, "
          f"got {mask.dtype} {mask.shape}.")
    _check_concrete_mask_rows("mask", mask)
  _util.check_finite("anchor", anchor)
  for k, other in enumerate(others):
    _util.check_finite(f"others[{k}]", other)

  dtype = _util.compute_dtype(anchor, *others)
  stacked = jnp.stack([o.astype(dtype) for o in others])
  basis, tuple_volume = orthonormal_tuples(stacked, mask)
  return block_volumes(anchor.astype(dtype), basis, tuple_volume)


# ---------------------------------------------------------------------------
# Logit statistics. The loss needs, over the valid samples of the global batch
# (logits l_ij = -logit_scale * vol(a_i, tuple_j), invalid entries excluded):
#   row_lse[i]    = logsumexp_j l_ij      (anchor i against all tuples)
#   column_lse[j] = logsumexp_i l_ij      (tuple j against all anchors)
#   column_sum[j] = sum_i l_ij            (for label smoothing)
# plus, for metrics only, the best negative of each row and column.
# Three ways to get them: dense (one device), all-gather, and a ring.
# ---------------------------------------------------------------------------


def _masked_logits(volumes, logit_scale, valid_rows, valid_columns):
  valid = valid_rows[:, None] & valid_columns[None, :]
  return jnp.where(valid, -logit_scale * volumes, _util.MASKED_LOGIT), valid


def _best_negative(logits, valid, is_positive, axis):
  return jnp.max(jnp.where(valid & ~is_positive, jax.lax.stop_gradient(logits),
                           -jnp.inf), axis=axis)


def _dense_stats(anchor, basis, tuple_volume, valid, logit_scale):
  """Statistics from the full [B, B] logits on one device."""
  logits, both_valid = _masked_logits(
      block_volumes(anchor, basis, tuple_volume), logit_scale, valid, valid)
  is_positive = jnp.eye(anchor.shape[0], dtype=bool)
  return (jax.nn.logsumexp(logits, axis=1),
          jax.nn.logsumexp(logits, axis=0),
          jnp.sum(jnp.where(both_valid, logits, 0.0), axis=0),
          _best_negative(logits, both_valid, is_positive, axis=1),
          _best_negative(logits, both_valid, is_positive, axis=0))


def _all_gather_stats(anchor, basis, tuple_volume, valid, logit_scale,
                      axis_name):
  """Statistics with all anchors and all tuple bases gathered on each device.

  Rows: local anchors x all tuples; columns: all anchors x local tuples. Two
  [b, B] logit blocks per device.
  """
  b = anchor.shape[0]
  ids = _util.block_ids(jax.lax.axis_index(axis_name), b)
  global_ids = jnp.arange(b * jax.lax.axis_size(axis_name))

  def gather(v, axis=0):
    return collectives.all_gather(v, axis_name, axis=axis)

  all_valid = gather(valid)
  row_logits, row_valid = _masked_logits(
      block_volumes(anchor, gather(basis, axis=1), gather(tuple_volume)),
      logit_scale, valid, all_valid)
  column_logits, column_valid = _masked_logits(
      block_volumes(gather(anchor), basis, tuple_volume), logit_scale,
      all_valid, valid)
  row_positive = ids[:, None] == global_ids[None, :]
  return (jax.nn.logsumexp(row_logits, axis=1),
          jax.nn.logsumexp(column_logits, axis=0),
          jnp.sum(jnp.where(column_valid, column_logits, 0.0), axis=0),
          _best_negative(row_logits, row_valid, row_positive, axis=1),
          _best_negative(column_logits, column_valid, row_positive.T, axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_stats(anchor, basis, tuple_volume, valid, logit_scale, axis_name):
  """Statistics with anchor blocks going round a ring; tuples stay home.

  At each step a device holds its own tuples, one visiting anchor block and
  their [b, b] logits. Column statistics of the local tuples accumulate on the
  device; row statistics of the visiting anchors (running logsumexp, best
  negative) travel with the anchor block and arrive home after the last step.
  The backward pass runs a second ring: the gradient of each anchor block
  travels with it, the gradients of the local bases accumulate at home.
  """
  return _ring_stats_fwd(anchor, basis, tuple_volume, valid, logit_scale,
                         axis_name)[0]


def _ring_stats_fwd(anchor, basis, tuple_volume, valid, logit_scale,
                    axis_name):
  b = anchor.shape[0]
  local_ids = _util.block_ids(jax.lax.axis_index(axis_name), b)

  def step(origin, local, visiting, visiting_acc):
    column_lse, column_sum, column_best = local
    anchor_visiting, valid_visiting = visiting
    row_lse, row_best = visiting_acc
    logits, both_valid = _masked_logits(
        block_volumes(anchor_visiting, basis, tuple_volume), logit_scale,
        valid_visiting, valid)
    is_positive = _util.block_ids(origin, b)[:, None] == local_ids[None, :]
    column_lse = jnp.logaddexp(column_lse, jax.nn.logsumexp(logits, axis=0))
    column_sum = column_sum + jnp.sum(jnp.where(both_valid, logits, 0.0), 0)
    column_best = jnp.maximum(
        column_best, _best_negative(logits, both_valid, is_positive, axis=0))
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    row_best = jnp.maximum(
        row_best, _best_negative(logits, both_valid, is_positive, axis=1))
    return (column_lse, column_sum, column_best), (row_lse, row_best)

  dtype = anchor.dtype
  empty_lse = jnp.full((b,), _util.MASKED_LOGIT, dtype)
  lowest = jnp.full((b,), -jnp.inf, dtype)
  (column_lse, column_sum, column_best), (row_lse, row_best) = _util.ring_loop(
      step, axis_name,
      local=(empty_lse, jnp.zeros((b,), dtype), lowest),
      visiting=(anchor, valid), visiting_acc=(empty_lse, lowest))
  outputs = (row_lse, column_lse, column_sum, row_best, column_best)
  residuals = (anchor, basis, tuple_volume, valid, logit_scale, row_lse,
               column_lse)
  return outputs, residuals


def _ring_stats_bwd(axis_name, residuals, cotangents):
  (anchor, basis, tuple_volume, valid, logit_scale, row_lse,
   column_lse) = residuals
  # The best-negative statistics are metrics and carry no gradient.
  row_lse_cotangent, column_lse_cotangent, column_sum_cotangent = cotangents[:3]

  def step(origin, local, visiting, visiting_acc):
    del origin  # The gradient does not single out positives.
    d_basis, d_tuple_volume, d_scale = local
    anchor_visiting, valid_visiting, row_lse_visiting, row_cotangent = visiting
    (d_anchor_visiting,) = visiting_acc
    volumes, volumes_vjp = jax.vjp(block_volumes, anchor_visiting, basis,
                                   tuple_volume)
    logits, both_valid = _masked_logits(volumes, logit_scale, valid_visiting,
                                        valid)
    d_logits = (
        row_cotangent[:, None] * jnp.exp(logits - row_lse_visiting[:, None]) +
        column_lse_cotangent[None, :] * jnp.exp(logits - column_lse[None, :]) +
        column_sum_cotangent[None, :])
    d_logits = jnp.where(both_valid, d_logits, 0.0)
    d_scale = d_scale - jnp.sum(d_logits * volumes)
    d_anchor, d_basis_step, d_tuple_volume_step = volumes_vjp(
        -logit_scale * d_logits)
    return ((d_basis + d_basis_step, d_tuple_volume + d_tuple_volume_step,
             d_scale), (d_anchor_visiting + d_anchor,))

  (d_basis, d_tuple_volume, d_scale), (d_anchor,) = _util.ring_loop(
      step, axis_name,
      local=(jnp.zeros_like(basis), jnp.zeros_like(tuple_volume),
             jnp.zeros_like(logit_scale)),
      visiting=(anchor, valid, row_lse, row_lse_cotangent),
      visiting_acc=(jnp.zeros_like(anchor),))
  return d_anchor, d_basis, d_tuple_volume, None, d_scale


_ring_stats.defvjp(_ring_stats_fwd, _ring_stats_bwd)


def check_gram_inputs(embeddings, anchor, masks):
  """Validates gram_loss inputs; returns the sorted names of the others."""
  if not isinstance(embeddings, Mapping):
    raise ValueError(
        f"embeddings must be a dict of modality name -> [B, D] array, got "
        f"{type(embeddings)}.")
  if anchor not in embeddings:
    raise ValueError(
        f"anchor {anchor!r} is not among the embeddings {sorted(embeddings)}.")
  others = sorted(name for name in embeddings if name != anchor)
  if not others:
    raise ValueError(
        f"gram_loss needs K >= 1 modalities besides the anchor {anchor!r}; "
        f"embeddings has only {sorted(embeddings)}.")
  for name in sorted(embeddings):
    _util.check_embedding(f"embeddings[{name!r}]", embeddings[name])
  _util.check_same_shape(
      {f"embeddings[{n!r}]": embeddings[n] for n in sorted(embeddings)},
      "Embeddings of all modalities")
  batch = embeddings[anchor].shape[0]
  if masks is not None:
    if not isinstance(masks, Mapping):
      raise ValueError(f"masks must be a dict of modality name -> [B] bool, "
                       f"got {type(masks)}.")
    unknown = sorted(set(masks) - set(embeddings))
    if unknown:
      raise ValueError(f"masks has modalities {unknown} that are not among "
                       f"the embeddings {sorted(embeddings)}.")
    for name, mask in masks.items():
      if (not hasattr(mask, "shape") or mask.shape != (batch,) or
          mask.dtype != jnp.bool_):
        raise ValueError(
            f"masks[{name!r}] must be a bool array of shape [B] = ({batch},), "
            f"got {getattr(mask, 'dtype', type(mask))} "
            f"{getattr(mask, 'shape', '')}.")
    # Modalities without a mask are present everywhere, so only a mask for
    # every modality can leave a sample empty.
    stacked = [masks[n] for n in sorted(masks)]
    if len(masks) == len(embeddings) and all(
        _util.is_concrete(m) for m in stacked):
      _check_concrete_mask_rows("masks", np.stack(
          [np.asarray(m) for m in stacked], axis=1))
  for name in sorted(embeddings):
    _util.check_finite(f"embeddings[{name!r}]", embeddings[name])
  return others


def presence(masks, anchor: str, others: Sequence[str], batch: int):
  """Which modalities and samples take part, from checked `masks`.

  Args:
    masks: None or modality name -> [batch] bool (True = present); modalities
      left out are present everywhere.
    anchor: the anchor's name.
    others: the other modalities, in tuple order.
    batch: the local batch size.

  Returns:
    (tuple_present, valid): [batch, K] bool presence of the tuple members, or
    None when every member is present; [batch] bool, True where the anchor
    and at least one other modality are present.
  """
  masks = {} if masks is None else masks
  if any(name in masks for name in others):
    tuple_present = jnp.stack(
        [masks.get(name, jnp.ones((batch,), bool)) for name in others], axis=1)
  else:
    tuple_present = None
  valid = masks.get(anchor, jnp.ones((batch,), bool))
  if tuple_present is not None:
    valid = valid & jnp.any(tuple_present, axis=1)
  return tuple_present, valid


def _gram_loss(embeddings, *, anchor, logit_scale, label_smoothing, masks,
               axis_name, stats_fn):
  others = check_gram_inputs(embeddings, anchor, masks)
  label_smoothing = _util.check_label_smoothing(label_smoothing)
  dtype = _util.compute_dtype(*embeddings.values())
  logit_scale = _util.as_scalar("logit_scale", logit_scale, dtype)
  anchor_embedding = embeddings[anchor].astype(dtype)
  b = anchor_embedding.shape[0]

  tuple_present, valid = presence(masks, anchor, others, b)
  basis, tuple_volume = orthonormal_tuples(
      jnp.stack([embeddings[name].astype(dtype) for name in others]),
      tuple_present)
  positive_volume = positive_volumes(anchor_embedding, basis, tuple_volume)
  positive_logit = -logit_scale * positive_volume
  row_lse, column_lse, column_sum, row_best, column_best = stats_fn(
      anchor_embedding, basis, tuple_volume, valid, logit_scale)

  def global_sum(v):
    total = jnp.sum(jnp.where(valid, v, 0.0))
    return total if axis_name is None else collectives.psum(total, axis_name)

  num_valid = jnp.maximum(global_sum(jnp.ones((b,), dtype)), 1.0)
  # Sum over rows and columns of the smoothed cross-entropies; the sum of all
  # logits, needed by the smoothing of both directions, is sum_j column_sum.
  total = global_sum(row_lse + column_lse -
                     2.0 * (1.0 - label_smoothing) * positive_logit -
                     2.0 * label_smoothing / num_valid * column_sum)
  loss = total / (2.0 * num_valid)

  def fraction(v):
    return global_sum(v.astype(dtype)) / num_valid

  metrics = {
      "loss": loss,
      "anchor->tuple/accuracy": fraction(positive_logit > row_best),
      "tuple->anchor/accuracy": fraction(positive_logit > column_best),
      "mean_positive_volume": fraction(positive_volume),
      "valid_fraction": num_valid / (b if axis_name is None else
                                     b * jax.lax.axis_size(axis_name)),
  }
  metrics["accuracy"] = 0.5 * (metrics["anchor->tuple/accuracy"] +
                               metrics["tuple->anchor/accuracy"])
  return loss, jax.lax.stop_gradient(metrics)


def _ring_stats_of_varying(anchor, basis, tuple_volume, valid, logit_scale,
                           axis_name):
  """`_ring_stats` on inputs cast to varying (the ring returns per-device
  values; the cast of replicated inputs transposes to a psum of gradients)."""
  return _ring_stats(*collectives.vary(
      (anchor, basis, tuple_volume, valid, logit_scale), axis_name), axis_name)


def gram_loss(embeddings: Mapping[str, jax.Array], *, anchor: str,
              logit_scale, label_smoothing=0.1, masks=None, axis_name=None):
  """GRAM contrastive loss between anchors and tuples of the other modalities.

  Logits l_ij = -logit_scale * vol(anchor_i, tuple_j) over the N valid
  samples of the global batch; loss = 1/2 [CE(anchor -> tuples) +
  CE(tuples -> anchor)], each the mean over N of the label-smoothed softmax
  cross-entropy of a row (resp. column).

  With `axis_name`, the anchor blocks go round the devices in a ring
  (`ppermute`) while each device keeps its tuples: per-device memory is
  O(b^2 K + b K D) whatever the number of devices. Row logsumexps travel with
  the anchors, column logsumexps accumulate at home; the backward pass is a
  second ring. Values and gradients equal the single-device result on the
  global batch.

  Args:
    embeddings: modality name -> [b, D] embeddings (b = local batch), all of
      one shape; the other modalities, in sorted name order, form the tuples.
    anchor: the anchor modality's name.
    logit_scale: scalar multiplier; logits are -volume * logit_scale.
    label_smoothing: eps in [0, 1); the target of each row/column puts
      1 - eps on its positive and eps / N on each of the N valid samples.
    masks: optional modality name -> [b] bool (True = present); modalities
      left out are present everywhere. An absent other modality leaves its
      sample's tuple. A sample takes part in the loss (as query, positive and
      negative) only if its anchor and at least one other modality are
      present; the others are left out and counted in `valid_fraction`. A
      sample with no modality at all is an error (checked on concrete masks).
    axis_name: mesh axis of the data-parallel batch, or None.

  Returns:
    (loss, metrics): the global mean loss (scalar); metrics, scalars: `loss`,
    `accuracy` (mean of the directions), `anchor->tuple/accuracy` and
    `tuple->anchor/accuracy` (fraction of valid samples whose positive logit
    beats every valid negative strictly), `mean_positive_volume`,
    `valid_fraction`.

  Raises:
    ValueError: an anchor not among the embeddings, no other modality (K = 0),
      embeddings of different shapes, masks of the wrong shape or dtype or
      for unknown modalities, a non-scalar logit_scale, label_smoothing
      outside [0, 1); on concrete inputs also NaN/Inf embeddings and a
      sample with no modality present.
  """
  stats_fn = (_dense_stats if axis_name is None else
              functools.partial(_ring_stats_of_varying, axis_name=axis_name))
  return _gram_loss(embeddings, anchor=anchor, logit_scale=logit_scale,
                    label_smoothing=label_smoothing, masks=masks,
                    axis_name=axis_name, stats_fn=stats_fn)


def gram_loss_all_gather(embeddings: Mapping[str, jax.Array], *, anchor: str,
                         logit_scale, label_smoothing=0.1, masks=None,
                         axis_name=None):
  """GRAM loss by all-gathering anchors and tuple bases: the ring's reference.

  Same arguments and result as `gram_loss`; each device computes [b, B]
  logits per direction (memory O(b B K + B K D)). Kept for tests and
  benchmarks.
  """
  stats_fn = (_dense_stats if axis_name is None else
              functools.partial(_all_gather_stats, axis_name=axis_name))
  return _gram_loss(embeddings, anchor=anchor, logit_scale=logit_scale,
                    label_smoothing=label_smoothing, masks=masks,
                    axis_name=axis_name, stats_fn=stats_fn)
