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
from mmjax.align import _gram_stats
from mmjax.align import _util
from mmjax.align._volumes import block_volumes
from mmjax.align._volumes import orthonormal_tuples
from mmjax.align._volumes import positive_volumes

__all__ = ["block_volumes", "check_gram_inputs", "gram_loss", "gram_loss_all_gather",
           "gram_volume", "orthonormal_tuples", "positive_volumes", "presence"]


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


def _check_negatives_gradient(negatives_gradient) -> bool:
  if not isinstance(negatives_gradient, (bool, np.bool_)):
    raise ValueError(
        f"negatives_gradient must be a Python bool (True: the exact gradient; "
        f"False: GRAM's reference gradient), got {type(negatives_gradient)}.")
  return bool(negatives_gradient)


def _gram_loss(embeddings, *, anchor, logit_scale, label_smoothing, masks,
               axis_name, negatives_gradient, stats_fn):
  others = check_gram_inputs(embeddings, anchor, masks)
  label_smoothing = _util.check_label_smoothing(label_smoothing)
  negatives_gradient = _check_negatives_gradient(negatives_gradient)
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
  if negatives_gradient:
    row_positive = column_positive = positive_logit
  else:   # each direction's positive as its negatives: one side held constant
    sg = jax.lax.stop_gradient
    row_positive = -logit_scale * positive_volumes(anchor_embedding, sg(basis),
                                                   sg(tuple_volume))
    column_positive = -logit_scale * positive_volumes(sg(anchor_embedding), basis,
                                                      tuple_volume)
  row_lse, row_sum, column_lse, column_sum, row_best, column_best = stats_fn(
      anchor_embedding, basis, tuple_volume, valid, logit_scale,
      negatives_gradient=negatives_gradient)

  def global_sum(v):
    total = jnp.sum(jnp.where(valid, v, 0.0))
    return total if axis_name is None else collectives.psum(total, axis_name)

  num_valid = jnp.maximum(global_sum(jnp.ones((b,), dtype)), 1.0)
  # Sum over rows and columns of the smoothed cross-entropies.
  total = global_sum(row_lse + column_lse -
                     (1.0 - label_smoothing) * (row_positive + column_positive) -
                     label_smoothing / num_valid * (row_sum + column_sum))
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


def gram_loss(embeddings: Mapping[str, jax.Array], *, anchor: str,
              logit_scale, label_smoothing=0.1, masks=None, axis_name=None,
              negatives_gradient=True):
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

  `negatives_gradient=False` gives GRAM's reference training signal (its code
  gathers the other devices' features without gradient, `concat_all_gather`,
  and scores local anchors against gathered tuples for the rows, gathered
  anchors against local tuples for the columns): CE(anchor -> tuples) is
  differentiated with respect to the anchors only, CE(tuples -> anchor) with
  respect to the tuples only, each with the other side held constant
  (`stop_gradient`), on one device as on many. The loss value is the same;
  `logit_scale` gets its gradient from both terms.

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
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.
    negatives_gradient: a Python bool; True (default) the exact gradient,
      False the reference gradient described above.

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
      outside [0, 1), a negatives_gradient that is not a bool; on concrete
      inputs also NaN/Inf embeddings and a sample with no modality present.
  """
  stats_fn = (_gram_stats.dense_stats if axis_name is None else
              functools.partial(_gram_stats.ring_stats, axis_name=axis_name))
  return _gram_loss(embeddings, anchor=anchor, logit_scale=logit_scale,
                    label_smoothing=label_smoothing, masks=masks,
                    axis_name=axis_name, negatives_gradient=negatives_gradient,
                    stats_fn=stats_fn)


def gram_loss_all_gather(embeddings: Mapping[str, jax.Array], *, anchor: str,
                         logit_scale, label_smoothing=0.1, masks=None,
                         axis_name=None, negatives_gradient=True):
  """GRAM loss by all-gathering anchors and tuple bases: the ring's reference.

  Same arguments and result as `gram_loss`; each device computes [b, B]
  logits per direction (memory O(b B K + B K D)). Kept for tests and
  benchmarks.
  """
  stats_fn = (_gram_stats.dense_stats if axis_name is None else
              functools.partial(_gram_stats.all_gather_stats,
                                axis_name=axis_name))
  return _gram_loss(embeddings, anchor=anchor, logit_scale=logit_scale,
                    label_smoothing=label_smoothing, masks=masks,
                    axis_name=axis_name, negatives_gradient=negatives_gradient,
                    stats_fn=stats_fn)
