"""Two array helpers every room of the library uses (align, models, fusion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
  """Whether `x` holds values (not an abstract tracer under jit/grad/vmap): checks
  that need values run only then."""
  return not isinstance(x, jax.core.Tracer)


def masked_mean(x: jax.Array, present: jax.Array) -> jax.Array:
  """Mean of `x` [B, M, ...] over the entries of axis 1 where `present` [B, M] is True.

  Absent entries are replaced by zeros before the sum (so NaN there cannot leak);
  rows with nothing present give zeros, not NaN.
  """
  weights = present.astype(x.dtype).reshape(present.shape + (1,) * (x.ndim - 2))
  total = jnp.sum(jnp.where(weights > 0, x, 0), axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1)
  return total / count
