"""Time-series encoder: 1-D convolutional stem + transformer over [B, T, C].

Padded steps (mask False) are zeroed before the stem, so whatever they held
never reaches the output. The stem downsamples time by `stem_stride`; token
i starts at step i * stem_stride and is valid when that step is. Attention
and pooling only see valid tokens.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

POOLS = ('mean', 'cls', 'map')


class TimeSeriesTransformer(nn.Module):
  """Encoder of multichannel sequences with a padding mask.

  Attributes:
    channels: expected input channels C.
    max_len: longest input in time steps (size of the position table is
      ceil(max_len / stem_stride) tokens).
    stem_kernel, stem_stride: first convolution ('SAME' padding); a second
      convolution of kernel 3 and stride 1 follows a GELU.
    width, depth, num_heads, mlp_dim: transformer architecture.
    pool: 'mean' (over valid tokens), 'cls' or 'map'.
    dropout, attn_dropout, drop_path: regularisation rates.
    dtype: compute dtype (params stay float32).
    remat, scan_layers: see `layers.TransformerStack`.
    activation, ln_eps: the blocks' MLP activation and LayerNorm epsilon
      (see `layers`).
  """
  channels: int = 1
  max_len: int = 512
  stem_kernel: int = 7
  stem_stride: int = 4
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: Any = None
  pool: str = 'mean'
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @property
  def output_width(self) -> int:
    return self.width

  def _check(self, x: jax.Array, mask: Optional[jax.Array]):
    layers.check_encoder_fields(self, POOLS)
    if x.ndim != 3:
      raise ValueError(
          f'time-series encoder expects [B, T, C]; got shape {x.shape}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'time-series encoder expects floats; got {x.dtype}')
    if x.shape[-1] != self.channels:
      raise ValueError(
          f'time series has {x.shape[-1]} channels; the encoder expects '
          f'channels={self.channels} (shape {x.shape})')
    if x.shape[1] > self.max_len:
      raise ValueError(
          f'time series of {x.shape[1]} steps is longer than the position '
          f'table max_len={self.max_len}')
    if mask is not None and (mask.shape != x.shape[:2] or
                             mask.dtype != jnp.bool_):
      raise ValueError(
          f'mask must be bool [B, T] = {x.shape[:2]}; got {mask.dtype} '
          f'{mask.shape}')

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, *,
               train: bool = False, return_tokens: bool = False):
    """Encodes sequences.

    Args:
      x: float [B, T, C].
      mask: bool [B, T], True for real steps (None: all real).
      train: enables dropout and stochastic depth (rng stream 'dropout').
      return_tokens: also return the tokens after the blocks.

    Returns:
      float32 features [B, width]; with `return_tokens`, (features, tokens
      float32 [B, N, width], their validity bool [B, N]).
    """
    self._check(x, mask)
    batch, steps, _ = x.shape
    if mask is None:
      mask = jnp.ones((batch, steps), bool)
    x = jnp.where(mask[..., None], x, 0.0)
    x = layers.Conv(self.width, (self.stem_kernel,), strides=(self.stem_stride,),
                    padding='SAME', dtype=self.dtype, name='stem_conv1')(x)
    x = nn.gelu(x)
    x = layers.Conv(self.width, (3,), padding='SAME', dtype=self.dtype,
                    name='stem_conv2')(x)
    valid = mask[:, ::self.stem_stride]
    num_tokens = x.shape[1]
    table = math.ceil(self.max_len / self.stem_stride)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (table, self.width), jnp.float32)
    x = x + pos[:num_tokens].astype(x.dtype)[None]
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width),
                       jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x],
          axis=1)
      valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    x = layers.encoder_stack(
        self, x, layers.padding_attention_mask(valid, causal=False), train=train)
    pooled = layers.pool_tokens(self, x, valid)
    if return_tokens:
      return pooled, x.astype(jnp.float32), valid
    return pooled
