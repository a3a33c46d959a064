"""Tabular encoder: per-feature normalisation, missing-value indicators, MLP.

Missing values are NaN in the input. Each feature f becomes two inputs to
the MLP: its normalised value (0 where missing, i.e. mean imputation) and a
0/1 indicator that it was missing, so the network can tell "missing" from
"equal to the mean".

Normalisation (`norm`):

- 'running' (default): running statistics in the 'batch_stats' collection:
  the mean and variance of every present value seen in training, updated
  exactly (Chan et al.'s parallel update of counts, means and squared
  deviations) whenever train=True. Both train and eval normalise with the
  statistics after the update, so the first batch already standardises its
  features. train=True needs `mutable=['batch_stats']`; with `axis_name`
  set (inside shard_map), the update sums over every device so all copies
  stay equal.
- 'learned': a learned per-feature shift and log-scale, initialised to the
  identity (for inputs already on a sensible scale).
- 'none': values pass through unchanged.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import collectives
from mmjax.models import layers

NORMS = ('running', 'learned', 'none')


def masked_moments(x: jax.Array, present: jax.Array,
                   axis_name: Optional[str] = None):
  """Per-feature count, mean and sum of squared deviations of present values.

  Args:
    x: [B, F] values (anything where absent).
    present: [B, F] bool.
    axis_name: sum over this mapped axis too (inside shard_map).

  Returns:
    (count [F], mean [F], m2 [F]); mean and m2 are 0 where count is 0.
  """
  weights = present.astype(jnp.float32)
  values = jnp.where(present, x.astype(jnp.float32), 0.0)
  count = weights.sum(axis=0)
  total = values.sum(axis=0)
  if axis_name is not None:
    count = collectives.psum(count, axis_name)
    total = collectives.psum(total, axis_name)
  mean = total / jnp.maximum(count, 1.0)
  m2 = (weights * (values - mean) ** 2).sum(axis=0)
  if axis_name is not None:
    m2 = collectives.psum(m2, axis_name)
  return count, mean, m2


class TabularMLP(nn.Module):
  """MLP encoder of tabular features [B, F].

  Attributes:
    width: hidden and output width.
    depth: number of Dense -> GELU (-> dropout) layers.
    norm: 'running', 'learned' or 'none' (see the module docstring).
    axis_name: mapped axis summed over when updating running statistics.
    eps: added to the variance before the square root.
    dropout: dropout rate after each hidden layer.
    dtype: compute dtype (params and statistics stay float32).
  """
  width: int = 128
  depth: int = 2
  norm: str = 'running'
  axis_name: Optional[str] = None
  eps: float = 1e-5
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @property
  def output_width(self) -> int:
    return self.width

  def _check(self, x: jax.Array):
    if self.norm not in NORMS:
      raise ValueError(f'norm={self.norm!r} is not one of {NORMS}')
    layers.check_dropout_rates(dropout=self.dropout)
    if self.depth < 1:
      raise ValueError(f'depth={self.depth} must be at least 1')
    if x.ndim != 2:
      raise ValueError(
          f'tabular encoder expects features [B, F]; got shape {x.shape}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f'tabular encoder expects float features (NaN = missing); got '
          f'{x.dtype}')
    if layers.is_concrete(x) and np.isinf(np.asarray(x)).any():
      raise ValueError(
          'tabular features contain +-Inf; only NaN marks a missing value')

  def _normalise(self, x, present, train):
    num_features = x.shape[1]
    if self.norm == 'none':
      return x
    if self.norm == 'learned':
      shift = self.param('shift', nn.initializers.zeros, (num_features,),
                         jnp.float32)
      log_scale = self.param('log_scale', nn.initializers.zeros,
                             (num_features,), jnp.float32)
      return (x - shift) * jnp.exp(-log_scale)
    zeros = lambda: jnp.zeros((num_features,), jnp.float32)  # noqa: E731
    count = self.variable('batch_stats', 'count', zeros)
    mean = self.variable('batch_stats', 'mean', zeros)
    m2 = self.variable('batch_stats', 'm2', zeros)
    if count.value.shape != (num_features,):
      raise ValueError(
          f'input has {num_features} features; the statistics were '
          f'initialised for {count.value.shape[0]}')
    if train and not self.is_initializing():
      if not self.is_mutable_collection('batch_stats'):
        raise ValueError(
            "TabularMLP(norm='running') updates its statistics when "
            "train=True: apply with mutable=['batch_stats'] (or use "
            "norm='learned')")
      b_count, b_mean, b_m2 = masked_moments(x, present, self.axis_name)
      total = count.value + b_count
      delta = b_mean - mean.value
      frac = b_count / jnp.maximum(total, 1.0)
      mean.value = mean.value + delta * frac
      m2.value = m2.value + b_m2 + delta ** 2 * count.value * frac
      count.value = total
    variance = jnp.where(count.value > 1,
                         m2.value / jnp.maximum(count.value - 1.0, 1.0), 1.0)
    return (x - mean.value) / jnp.sqrt(variance + self.eps)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_tokens: bool = False):
    """Encodes tabular rows.

    Args:
      x: float [B, F]; NaN marks a missing value.
      train: updates running statistics ('running' norm) and enables dropout.
      return_tokens: also return the row as a sequence of one token.

    Returns:
      float32 features [B, width]; with `return_tokens`, (features, tokens
      [B, 1, width] (the features), token mask bool [B, 1], all True).
    """
    self._check(x)
    x = x.astype(jnp.float32)
    present = ~jnp.isnan(x)
    normed = self._normalise(jnp.where(present, x, 0.0), present, train)
    normed = jnp.where(present, normed, 0.0)
    h = jnp.concatenate([normed, (~present).astype(jnp.float32)], axis=-1)
    h = h.astype(self.dtype)
    for i in range(self.depth):
      h = nn.Dense(self.width, dtype=self.dtype, name=f'dense_{i}')(h)
      h = nn.gelu(h)
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.LayerNorm(dtype=self.dtype, name='out_norm')(h).astype(jnp.float32)
    if return_tokens:
      return h, h[:, None], jnp.ones((h.shape[0], 1), bool)
    return h
