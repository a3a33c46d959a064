"""Volume-guided hard negatives and the matching loss (GRAM's data-anchor matching).

Beside its contrastive loss, GRAM (Cicchetti et al., 2025) trains a small
fusion block to say whether an anchor (a caption) and a tuple of the other
modalities come from the same sample. The negatives it sees are hard ones:
for anchor i, a tuple j != i drawn with probability

  P(j | i) = softmax_j(l_ij) over the valid j != i,   l_ij = -logit_scale * vol(a_i, tuple_j),

i.e. the GRAM logits, so the tuples that almost fit the anchor are drawn most
often; and for tuple j, an anchor i != j drawn from the column softmax of the
same logits. The block scores each sample's positive pair and its two negative
pairs, and binary cross-entropy trains it.

This module holds the math: drawing the negatives and the loss. The block is a
model part (`mmjax.models.matching`); the objective that calls both lives in
`mmjax.train.objectives` (kind 'matching').

Sampling is exact (Gumbel-max: the argmax of logits plus Gumbel noise is a
draw from their softmax) and keyed per global row, `fold_in(rng, row)`, so a
given `rng` draws the same negatives whatever the number of devices. With
`axis_name` the candidates are the whole global batch: each device gathers the
embeddings (no gradient flows through the draw) and holds two [b, B] logit
blocks, O(b B K) memory, which is fine for the small batches this objective
trains on; the contrastive loss itself keeps its ring.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

from mmjax import collectives
from mmjax.align import _util
from mmjax.align import gram


def sample_excluding(logits, rng, *, allowed, row_ids=None):
  """One column per row, drawn from the softmax of the allowed logits.

  Args:
    logits: [R, N] float.
    rng: a PRNG key.
    allowed: [R, N] bool; column j can be drawn for row r only if
      allowed[r, j].
    row_ids: optional [R] int, the global id of each row; row r's noise is
      keyed by `fold_in(rng, row_ids[r])` (default: r), so a row draws the
      same column wherever it is computed.

  Returns:
    (index, found): [R] int32 drawn columns, with
    P(index[r] = j) = exp(logits[r, j]) / sum_{allowed j'} exp(logits[r, j']);
    [R] bool, False for a row with no allowed column (its index is 0 and
    meaningless).

  Raises:
    ValueError: logits not [R, N] float, allowed or row_ids of another shape.
  """
  if (getattr(logits, "ndim", None) != 2 or
      not jnp.issubdtype(logits.dtype, jnp.floating)):
    raise ValueError(f"logits must be a float array [R, N], got "
                     f"{getattr(logits, 'dtype', type(logits))} "
                     f"{getattr(logits, 'shape', '')}.")
  if getattr(allowed, "shape", None) != logits.shape:
    raise ValueError(f"allowed must have the shape of logits {logits.shape}, got "
                     f"{getattr(allowed, 'shape', type(allowed))}.")
  rows, columns = logits.shape
  if row_ids is None:
    row_ids = jnp.arange(rows)
  if getattr(row_ids, "shape", None) != (rows,):
    raise ValueError(f"row_ids must have shape [R] = ({rows},), got "
                     f"{getattr(row_ids, 'shape', type(row_ids))}.")
  dtype = _util.compute_dtype(logits)
  noise = jax.vmap(lambda row: jax.random.gumbel(
      jax.random.fold_in(rng, row), (columns,), dtype))(row_ids)
  perturbed = jnp.where(allowed, logits.astype(dtype) + noise, -jnp.inf)
  index = jnp.argmax(perturbed, axis=1).astype(jnp.int32)
  found = jnp.any(allowed, axis=1)
  return jnp.where(found, index, 0), found


def matching_negatives(embeddings: Mapping[str, jax.Array], *, anchor: str,
                       logit_scale, rng, masks=None, axis_name=None):
  """Hard negatives of every local sample, drawn in proportion to softmax(-volume).

  Args:
    embeddings: modality name -> [b, D] (b = local batch), all of one shape;
      the modalities other than `anchor`, in sorted name order, form the
      tuples (as in `gram_loss`).
    anchor: the anchor modality's name.
    logit_scale: scalar; the draw follows softmax(-volume * logit_scale).
    rng: a PRNG key, the same on every device (each row folds in its global
      index).
    masks: optional modality name -> [b] bool, as in `gram_loss`: a sample is
      valid (takes part, and can be drawn) if its anchor and at least one
      other modality are present.
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.

  Returns:
    A dict of [b] arrays for the local samples:
      'negative_tuple': int32, global batch index of the tuple drawn for
        each local anchor (never the sample itself, never an invalid one);
      'negative_anchor': int32, global index of the anchor drawn for each
        local tuple;
      'valid': bool, the sample takes part;
      'has_negative': bool, valid and some other valid sample exists in the
        global batch (else the indices are meaningless).
    No gradient flows through any of them.

  Raises:
    ValueError: as `gram_loss` for the embeddings, anchor and masks, and a
      non-scalar logit_scale.
  """
  others = gram.check_gram_inputs(embeddings, anchor, masks)
  dtype = _util.compute_dtype(*embeddings.values())
  logit_scale = jax.lax.stop_gradient(
      _util.as_scalar("logit_scale", logit_scale, dtype))
  anchor_embedding = jax.lax.stop_gradient(embeddings[anchor].astype(dtype))
  stacked = jax.lax.stop_gradient(
      jnp.stack([embeddings[name].astype(dtype) for name in others]))
  b = anchor_embedding.shape[0]
  tuple_present, valid = gram.presence(masks, anchor, others, b)
  if tuple_present is None:
    tuple_present = jnp.ones((b, len(others)), bool)

  if axis_name is None:
    ids = jnp.arange(b)
    gather = lambda x, axis=0: x  # pylint: disable=unnecessary-lambda-assignment
  else:
    ids = _util.block_ids(jax.lax.axis_index(axis_name), b)
    gather = lambda x, axis=0: collectives.all_gather(  # pylint: disable=unnecessary-lambda-assignment
        x, axis_name, axis=axis)
  all_anchors, all_valid = gather(anchor_embedding), gather(valid)
  all_basis, all_volume = gram.orthonormal_tuples(gather(stacked, axis=1),
                                                  gather(tuple_present))
  local_basis, local_volume = gram.orthonormal_tuples(stacked, tuple_present)
  all_ids = jnp.arange(all_anchors.shape[0])

  # Row i: local anchor i against every tuple; row j of the second block:
  # local tuple j against every anchor.
  anchor_logits = -logit_scale * gram.block_volumes(anchor_embedding, all_basis,
                                                    all_volume)
  tuple_logits = -logit_scale * gram.block_volumes(all_anchors, local_basis,
                                                   local_volume).T
  allowed = (valid[:, None] & all_valid[None, :] &
             (ids[:, None] != all_ids[None, :]))
  tuple_rng, anchor_rng = jax.random.split(rng)
  negative_tuple, found = sample_excluding(anchor_logits, tuple_rng,
                                           allowed=allowed, row_ids=ids)
  negative_anchor, _ = sample_excluding(tuple_logits, anchor_rng,
                                        allowed=allowed, row_ids=ids)
  return {"negative_tuple": negative_tuple, "negative_anchor": negative_anchor,
          "valid": valid, "has_negative": found}


def matching_loss(positive_logits, negative_tuple_logits, negative_anchor_logits, *,
                  valid, has_negative, axis_name=None):
  """Binary cross-entropy of matching scores over the global batch.

  Sample i contributes its positive pair (label 1) if valid, and its two
  negative pairs (anchor i with a drawn tuple, tuple i with a drawn anchor;
  label 0) if it has negatives. The loss is the mean over all contributed
  pairs of the global batch, GRAM's two-class cross-entropy written with one
  logit.

  Args:
    positive_logits, negative_tuple_logits, negative_anchor_logits: [b]
      float, the block's logit that the pair matches.
    valid, has_negative: [b] bool, from `matching_negatives`.
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.

  Returns:
    (loss, metrics): scalar loss; metrics `loss`, `accuracy` (pairs on the
    right side of 0), `positive_accuracy`, `negative_accuracy`,
    `mean_positive_probability`, `mean_negative_probability`.

  Raises:
    ValueError: arrays that are not [b], or of different lengths.
  """
  named = {"positive_logits": positive_logits,
           "negative_tuple_logits": negative_tuple_logits,
           "negative_anchor_logits": negative_anchor_logits,
           "valid": valid, "has_negative": has_negative}
  for name, x in named.items():
    if getattr(x, "ndim", None) != 1:
      raise ValueError(f"{name} must have shape [b], got "
                       f"{getattr(x, 'shape', type(x))}.")
  if len({x.shape for x in named.values()}) > 1:
    raise ValueError("matching_loss inputs must all have shape [b], got "
                     f"{ {n: x.shape for n, x in named.items()} }.")
  dtype = _util.compute_dtype(positive_logits, negative_tuple_logits,
                              negative_anchor_logits)
  positive = positive_logits.astype(dtype)
  negatives = jnp.stack([negative_tuple_logits, negative_anchor_logits]).astype(dtype)
  positive_weight = valid.astype(dtype)
  negative_weight = (valid & has_negative).astype(dtype)

  def global_sum(x):
    total = jnp.sum(x)
    return total if axis_name is None else collectives.psum(total, axis_name)

  num_positive = global_sum(positive_weight)
  num_negative = 2.0 * global_sum(negative_weight)
  # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z).
  total = (global_sum(positive_weight * jax.nn.softplus(-positive)) +
           global_sum(negative_weight * jax.nn.softplus(negatives)))
  loss = total / jnp.maximum(num_positive + num_negative, 1.0)
  right_positive = global_sum(positive_weight * (positive > 0))
  right_negative = global_sum(negative_weight * (negatives < 0))
  metrics = {
      "loss": loss,
      "accuracy": (right_positive + right_negative) /
                  jnp.maximum(num_positive + num_negative, 1.0),
      "positive_accuracy": right_positive / jnp.maximum(num_positive, 1.0),
      "negative_accuracy": right_negative / jnp.maximum(num_negative, 1.0),
      "mean_positive_probability": global_sum(
          positive_weight * jax.nn.sigmoid(positive)) / jnp.maximum(num_positive, 1.0),
      "mean_negative_probability": global_sum(
          negative_weight * jax.nn.sigmoid(negatives)) / jnp.maximum(num_negative, 1.0),
  }
  return loss, jax.lax.stop_gradient(metrics)
