"""Contrastive alignment losses: CLIP (softmax InfoNCE) and SigLIP (sigmoid).

All losses take local [B, D] embeddings and a scalar `logit_scale` (the multiplier,
already exponentiated: 1 / temperature) and return `(loss, metrics)`, both scalars.

Multi-device convention (`axis_name` given, inside `jax.shard_map` over that
mesh axis, each device holding its block of b = B / n rows of the global batch,
in device order). `axis_name` may be a tuple of mesh axes (the train step passes
every axis the batch is split over): devices are then ordered by their flat index
over them, and gathers, sums and rings run over all of them.

* Every device returns the same scalar: the loss of the global batch of B
  samples, exactly as a single device would compute it on the concatenated
  batch. It is typed invariant over `axis_name`, so it can leave `shard_map`
  with `out_specs=P()`, and so can every metric.
* Gradients. Autodiff through the collectives (all_gather -> reduce-scatter,
  ppermute -> reverse ppermute) gives each device the gradient of the global
  loss with respect to its own embeddings; the SigLIP and GRAM rings have
  their own VJPs that do the same explicitly. Hence:
    - `jax.grad` of the shard_mapped loss with respect to the global
      embeddings equals the single-device gradient;
    - a trainer that takes `jax.grad` of this per-device loss inside
      `shard_map` with respect to replicated params and then applies
      `jax.lax.pmean(grads, axis_name)` gets the global-batch gradient. With
      `shard_map`'s default `check_vma=True`, the grads are already the
      global gradient before the pmean (autodiff psums the contributions of
      the devices, the params being broadcast to all of them) and the pmean
      leaves them unchanged; with `check_vma=False` (pmap semantics, where
      the transpose of psum is psum) each device holds n times its own
      contribution and the pmean averages them into the same global
      gradient. Both are tested.

Bad shapes raise `ValueError`. NaN/Inf inputs raise `ValueError` when the
inputs are concrete (eager calls); under `jit` they cannot be inspected and
show up as a non-finite loss.
"""

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from mmjax import collectives
from mmjax.align import _util

# CLIP: logit_scale = exp(t), t learned from log(1 / 0.07), capped at 100 (Radford 2021).
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0
# SigLIP: t = log 10, bias -10 (Zhai et al., 2023): the many negatives start small.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def siglip_init() -> tuple[float, float]:
  """Initial values `(t, bias)` of SigLIP's learnable log-scale and bias.

  The loss takes `logit_scale = exp(t)`; at initialisation that is 10.
  """
  return SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS


def _check_pair(x, y, names=("x", "y")):
  _util.check_embedding(names[0], x)
  _util.check_embedding(names[1], y)
  _util.check_same_shape({names[0]: x, names[1]: y}, "Embeddings")
  _util.check_finite(names[0], x)
  _util.check_finite(names[1], y)


def _gather(x, axis_name):
  """The global batch [n * b, ...] on every device (x itself without axis)."""
  if axis_name is None:
    return x
  return collectives.all_gather(x, axis_name)


def _global_sum(x, axis_name):
  """Sum over the local entries of `x`, then over devices."""
  total = jnp.sum(x)
  return total if axis_name is None else collectives.psum(total, axis_name)


def _global_batch_size(local_batch_size: int, axis_name) -> int:
  if axis_name is None:
    return local_batch_size
  return local_batch_size * jax.lax.axis_size(axis_name)


def _positive_is_top1(logits, positive_index):
  """[R] bool: the positive beats every other column of its row (strictly)."""
  columns = jnp.arange(logits.shape[1])
  is_positive = columns[None, :] == positive_index[:, None]
  positive = jnp.sum(jnp.where(is_positive, logits, 0.0), axis=1)
  best_negative = jnp.max(jnp.where(is_positive, -jnp.inf, logits), axis=1)
  return positive > best_negative


def clip_loss(x, y, *, logit_scale, label_smoothing=0.0, axis_name=None):
  """Symmetric softmax InfoNCE (CLIP): 1/2 [CE(x -> y) + CE(y -> x)].

  With logits l_ij = logit_scale * <x_i, y_j> over the global batch, row i of
  CE(x -> y) is the cross-entropy of softmax_j(l_ij) against the target
  (1 - eps) * [j == i] + eps / B; CE(y -> x) is the same on the columns. Each
  direction is averaged over the B rows.

  With `axis_name`, negatives come from every device: x and y are gathered
  (tiled all_gather) and each device computes the rows of its own queries
  against all keys, [b, B] logits per direction. See the module docstring for
  the per-device loss and gradient convention.

  Args:
    x: [b, D] embeddings of the first modality (b = local batch).
    y: [b, D] embeddings of the second modality; row i pairs with x[i].
    logit_scale: scalar multiplier of the similarities (1 / temperature).
    label_smoothing: eps in [0, 1).
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.

  Returns:
    (loss, metrics): the global mean loss (scalar); metrics, scalars:
    `loss`, `accuracy` (mean of the two directions), `x->y/accuracy` and
    `y->x/accuracy` (fraction of rows whose positive logit beats every
    negative strictly), `mean_positive_similarity` (mean <x_i, y_i>).

  Raises:
    ValueError: x or y not [b, D] floating arrays of one shape, a non-scalar
      logit_scale, label_smoothing outside [0, 1); NaN/Inf in concrete inputs.
  """
  _check_pair(x, y)
  label_smoothing = _util.check_label_smoothing(label_smoothing)
  dtype = _util.compute_dtype(x, y)
  x, y = x.astype(dtype), y.astype(dtype)
  logit_scale = _util.as_scalar("logit_scale", logit_scale, dtype)

  b = x.shape[0]
  global_b = _global_batch_size(b, axis_name)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  positive_index = offset + jnp.arange(b)

  logits_xy = logit_scale * x @ _gather(y, axis_name).T  # [b, B]
  if axis_name is None:
    logits_yx = logits_xy.T
  else:
    logits_yx = logit_scale * y @ _gather(x, axis_name).T  # [b, B]

  def positive(logits):
    return jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]

  row_losses = (
      _util.smoothed_cross_entropy(logits_xy, positive(logits_xy),
                                   label_smoothing) +
      _util.smoothed_cross_entropy(logits_yx, positive(logits_yx),
                                   label_smoothing))
  loss = _global_sum(row_losses, axis_name) / (2 * global_b)

  def fraction(v):
    return _global_sum(v.astype(dtype), axis_name) / global_b

  metrics = {
      "loss": loss,
      "x->y/accuracy": fraction(_positive_is_top1(logits_xy, positive_index)),
      "y->x/accuracy": fraction(_positive_is_top1(logits_yx, positive_index)),
      "mean_positive_similarity": fraction(jnp.sum(x * y, axis=1)),
  }
  metrics["accuracy"] = 0.5 * (metrics["x->y/accuracy"] +
                               metrics["y->x/accuracy"])
  return loss, jax.lax.stop_gradient(metrics)


def _siglip_terms(logits, is_positive):
  """-log sigmoid(z * logits) with z = +1 on positives, -1 elsewhere."""
  return jax.nn.softplus(jnp.where(is_positive, -logits, logits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _siglip_ring(x, y, logit_scale, logit_bias, axis_name):
  """Per-row SigLIP loss sums over the global batch; y blocks go round a ring.

  Args:
    x, y: [b, D] local blocks (varying over `axis_name`).
    logit_scale, logit_bias: scalars (varying over `axis_name`).
    axis_name: the ring's mesh axis.

  Returns:
    row_loss [b]: sum_j -log sigmoid(z_ij l_ij) over all B columns j, for the
      local rows i;
    row_best_negative [b]: max_{j != i} l_ij for the local rows;
    column_best_negative [b]: max_{i != j} l_ij for the local columns (y).
    The two maxima are statistics for metrics and have no gradient.
  """
  return _siglip_ring_fwd(x, y, logit_scale, logit_bias, axis_name)[0]


def _siglip_ring_fwd(x, y, logit_scale, logit_bias, axis_name):
  b = x.shape[0]
  row_ids = _util.block_ids(jax.lax.axis_index(axis_name), b)

  def step(origin, local, visiting, visiting_acc):
    row_loss, row_best_negative = local
    (y_visiting,) = visiting
    (column_best_negative,) = visiting_acc
    logits = logit_scale * x @ y_visiting.T + logit_bias  # [b, b]
    is_positive = row_ids[:, None] == _util.block_ids(origin, b)[None, :]
    negatives = jnp.where(is_positive, -jnp.inf, logits)
    row_loss = row_loss + jnp.sum(_siglip_terms(logits, is_positive), axis=1)
    row_best_negative = jnp.maximum(row_best_negative, negatives.max(axis=1))
    column_best_negative = jnp.maximum(column_best_negative,
                                       negatives.max(axis=0))
    return (row_loss, row_best_negative), (column_best_negative,)

  lowest = jnp.full((b,), -jnp.inf, x.dtype)
  (row_loss, row_best_negative), (column_best_negative,) = _util.ring_loop(
      step, axis_name, local=(jnp.zeros((b,), x.dtype), lowest),
      visiting=(y,), visiting_acc=(lowest,))
  outputs = (row_loss, row_best_negative, column_best_negative)
  return outputs, (x, y, logit_scale, logit_bias)


def _siglip_ring_bwd(axis_name, residuals, cotangents):
  x, y, logit_scale, logit_bias = residuals
  row_loss_cotangent = cotangents[0]  # The best-negative statistics have none.
  b = x.shape[0]
  row_ids = _util.block_ids(jax.lax.axis_index(axis_name), b)

  def step(origin, local, visiting, visiting_acc):
    dx, dscale, dbias = local
    (y_visiting,) = visiting
    (dy_visiting,) = visiting_acc
    similarity = x @ y_visiting.T
    logits = logit_scale * similarity + logit_bias
    is_positive = row_ids[:, None] == _util.block_ids(origin, b)[None, :]
    z = jnp.where(is_positive, 1.0, -1.0).astype(x.dtype)
    # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l).
    dlogits = row_loss_cotangent[:, None] * (-z) * jax.nn.sigmoid(-z * logits)
    dx = dx + logit_scale * dlogits @ y_visiting
    dy_visiting = dy_visiting + logit_scale * dlogits.T @ x
    dscale = dscale + jnp.sum(dlogits * similarity)
    dbias = dbias + jnp.sum(dlogits)
    return (dx, dscale, dbias), (dy_visiting,)

  (dx, dscale, dbias), (dy,) = _util.ring_loop(
      step, axis_name,
      local=(jnp.zeros_like(x), jnp.zeros_like(logit_scale),
             jnp.zeros_like(logit_bias)),
      visiting=(y,), visiting_acc=(jnp.zeros_like(y),))
  return dx, dy, dscale, dbias


_siglip_ring.defvjp(_siglip_ring_fwd, _siglip_ring_bwd)


def siglip_loss(x, y, *, logit_scale, logit_bias, axis_name=None):
  """Pairwise sigmoid loss (SigLIP).

  loss = -1/B sum_{i,j} log sigmoid(z_ij * (logit_scale * <x_i, y_j> + bias))
  over the global batch of B, with z_ii = 1 and z_ij = -1 for i != j.

  With `axis_name`, the y blocks travel around the devices in a ring
  (`ppermute`, one hop per step): each device holds its own x and y blocks, one
  visiting y block and [b, b] logits at a time, so its memory is O(b^2 + b D)
  whatever the number of devices; the backward pass runs a second ring in
  which the gradient of each y block travels with it and arrives home at the
  end. Values and gradients equal the single-device computation on the
  global batch; see the module docstring for the per-device convention.

  Args:
    x: [b, D] embeddings of the first modality (b = local batch).
    y: [b, D] embeddings of the second modality; row i pairs with x[i].
    logit_scale: scalar multiplier of the similarities.
    logit_bias: scalar bias added to the scaled similarities.
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.

  Returns:
    (loss, metrics): the global loss (scalar); metrics, scalars: `loss`,
    `accuracy` (mean of the two directions), `x->y/accuracy`,
    `y->x/accuracy` (fraction of rows/columns whose positive logit beats every
    negative strictly), `mean_positive_similarity` (mean <x_i, y_i>).

  Raises:
    ValueError: x or y not [b, D] floating arrays of one shape, a non-scalar
      logit_scale or logit_bias; NaN/Inf in concrete inputs.
  """
  _check_pair(x, y)
  dtype = _util.compute_dtype(x, y)
  x, y = x.astype(dtype), y.astype(dtype)
  logit_scale = _util.as_scalar("logit_scale", logit_scale, dtype)
  logit_bias = _util.as_scalar("logit_bias", logit_bias, dtype)

  b = x.shape[0]
  global_b = _global_batch_size(b, axis_name)
  positive_logit = logit_scale * jnp.sum(x * y, axis=1) + logit_bias
  if axis_name is None:
    logits = logit_scale * x @ y.T + logit_bias
    is_positive = jnp.eye(b, dtype=bool)
    row_loss = jnp.sum(_siglip_terms(logits, is_positive), axis=1)
    negatives = jnp.where(is_positive, -jnp.inf, logits)
    row_best_negative = negatives.max(axis=1)
    column_best_negative = negatives.max(axis=0)
  else:
    row_loss, row_best_negative, column_best_negative = _siglip_ring(
        *collectives.vary((x, y, logit_scale, logit_bias), axis_name),
        axis_name)

  loss = _global_sum(row_loss, axis_name) / global_b

  def fraction(v):
    return _global_sum(v.astype(dtype), axis_name) / global_b

  metrics = {
      "loss": loss,
      "x->y/accuracy": fraction(positive_logit > row_best_negative),
      "y->x/accuracy": fraction(positive_logit > column_best_negative),
      "mean_positive_similarity": fraction(jnp.sum(x * y, axis=1)),
  }
  metrics["accuracy"] = 0.5 * (metrics["x->y/accuracy"] +
                               metrics["y->x/accuracy"])
  return loss, jax.lax.stop_gradient(metrics)


def siglip_loss_all_gather(x, y, *, logit_scale, logit_bias, axis_name=None):
  """SigLIP by all-gathering y: the reference for the ring in `siglip_loss`.

  Same arguments, result and metrics as `siglip_loss`, but each device
  gathers the whole y batch and computes [b, B] logits (memory O(b B + B D)
  per device). Kept for tests and benchmarks.
  """
  _check_pair(x, y)
  dtype = _util.compute_dtype(x, y)
  x, y = x.astype(dtype), y.astype(dtype)
  logit_scale = _util.as_scalar("logit_scale", logit_scale, dtype)
  logit_bias = _util.as_scalar("logit_bias", logit_bias, dtype)

  b = x.shape[0]
  global_b = _global_batch_size(b, axis_name)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  positive_index = offset + jnp.arange(b)
  logits = logit_scale * x @ _gather(y, axis_name).T + logit_bias  # [b, B]
  is_positive = jnp.arange(global_b)[None, :] == positive_index[:, None]
  loss = _global_sum(_siglip_terms(logits, is_positive), axis_name) / global_b

  # The y -> x direction only needs each column's best negative: a max over
  # the local rows, then over devices; this device keeps its own columns.
  negatives = jnp.where(is_positive, -jnp.inf, jax.lax.stop_gradient(logits))
  column_best_negative = negatives.max(axis=0)  # [B]
  if axis_name is not None:
    column_best_negative = jax.lax.dynamic_slice_in_dim(
        jax.lax.pmax(column_best_negative, axis_name), offset, b)
  positive_logit = logit_scale * jnp.sum(x * y, axis=1) + logit_bias

  def fraction(v):
    return _global_sum(v.astype(dtype), axis_name) / global_b

  metrics = {
      "loss": loss,
      "x->y/accuracy": fraction(positive_logit > negatives.max(axis=1)),
      "y->x/accuracy": fraction(positive_logit > column_best_negative),
      "mean_positive_similarity": fraction(jnp.sum(x * y, axis=1)),
  }
  metrics["accuracy"] = 0.5 * (metrics["x->y/accuracy"] +
                               metrics["y->x/accuracy"])
  return loss, jax.lax.stop_gradient(metrics)


def pairwise_loss(embeddings: Mapping[str, jax.Array], *, anchor=None,
                  kind="clip", logit_scale, logit_bias=None,
                  label_smoothing=0.0, axis_name=None):
  """Contrastive loss averaged over pairs of modalities.

  With `anchor`, every other modality m is paired with the anchor
  (ImageBind-style), as `loss(x=embeddings[m], y=embeddings[anchor])`.
  Without, every unordered pair (a, b) with a < b in sorted name order is
  used, as `loss(x=embeddings[a], y=embeddings[b])`. The loss is the mean of
  the pair losses.

  Args:
    embeddings: modality name -> [b, D] embeddings, all of one shape.
    anchor: name of the anchor modality, or None for all pairs.
    kind: 'clip' (`clip_loss`) or 'siglip' (`siglip_loss`).
    logit_scale: scalar multiplier of the similarities.
    logit_bias: scalar bias, required for 'siglip', not accepted for 'clip'.
    label_smoothing: eps for 'clip'; must stay 0 for 'siglip'.
    axis_name: the mesh axis (or tuple of axes) the batch is split over, or None.

  Returns:
    (loss, metrics): the mean pair loss; metrics, scalars: `loss`, `accuracy`
    (mean over pairs and directions), and per pair (x, y):
    `x|y/loss`, `x->y/accuracy`, `y->x/accuracy`,
    `x|y/mean_positive_similarity`.

  Raises:
    ValueError: fewer than two modalities, embeddings of different shapes, an
      anchor not among them, an unknown kind, logit_bias missing for 'siglip'
      or given for 'clip', label_smoothing given for 'siglip', and whatever
      the pair loss rejects.
  """
  if not isinstance(embeddings, Mapping):
    raise ValueError(
        f"embeddings must be a dict of modality name -> [B, D] array, got "
        f"{type(embeddings)}.")
  if len(embeddings) < 2:
    raise ValueError(
        f"pairwise_loss needs at least two modalities, got "
        f"{list(embeddings)}.")
  names = sorted(embeddings)
  for name in names:
    _util.check_embedding(f"embeddings[{name!r}]", embeddings[name])
  _util.check_same_shape({f"embeddings[{n!r}]": embeddings[n] for n in names},
                         "Embeddings of all modalities")
  if anchor is not None and anchor not in embeddings:
    raise ValueError(
        f"anchor {anchor!r} is not among the embeddings {names}.")

  if kind == "clip":
    if logit_bias is not None:
      raise ValueError("logit_bias is only used by kind='siglip'; got one for "
                       "kind='clip'.")
    pair_loss = functools.partial(clip_loss, logit_scale=logit_scale,
                                  label_smoothing=label_smoothing,
                                  axis_name=axis_name)
  elif kind == "siglip":
    if logit_bias is None:
      raise ValueError("kind='siglip' needs logit_bias.")
    if label_smoothing:
      raise ValueError("label_smoothing is only used by kind='clip'; got "
                       f"{label_smoothing} for kind='siglip'.")
    pair_loss = functools.partial(siglip_loss, logit_scale=logit_scale,
                                  logit_bias=logit_bias, axis_name=axis_name)
  else:
    raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}.")

  if anchor is None:
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
  else:
    pairs = [(m, anchor) for m in names if m != anchor]

  metrics = {}
  losses, accuracies = [], []
  for a, b in pairs:
    loss, pair_metrics = pair_loss(embeddings[a], embeddings[b])
    losses.append(loss)
    accuracies.append(pair_metrics["accuracy"])
    metrics[f"{a}|{b}/loss"] = pair_metrics["loss"]
    metrics[f"{a}->{b}/accuracy"] = pair_metrics["x->y/accuracy"]
    metrics[f"{b}->{a}/accuracy"] = pair_metrics["y->x/accuracy"]
    metrics[f"{a}|{b}/mean_positive_similarity"] = pair_metrics["mean_positive_similarity"]
  loss = sum(losses) / len(losses)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  metrics["accuracy"] = sum(accuracies) / len(accuracies)
  return loss, metrics
