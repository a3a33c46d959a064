"""Volumes of anchors with tuples of embeddings, from the tuples' orthonormal bases.

Private to `mmjax.align` (`gram.py` and `matching.py` use it; `mmjax.align.gram`
re-exports `orthonormal_tuples`, `block_volumes` and `positive_volumes`). See
`mmjax.align.gram` for the factorisation vol(a, tuple) = vol(tuple) * dist(a, span).
"""

import jax.numpy as jnp


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
