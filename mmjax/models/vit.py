"""Vision Transformer for images [B, H, W, C] and videos [B, T, H, W, C].

Images are cut into non-overlapping p x p patches; videos into t x p x p
tubelets (ViViT's tubelet embedding). Tokens get a learned position
embedding and go through a pre-LN transformer; the output is one pooled
feature vector per example.

The fields that published image towers differ in: `activation` and `ln_eps`
(see `layers`), `patch_bias` (CLIP's patch embedding has no bias), `pre_norm`
(CLIP's LayerNorm before the blocks), `pool` ('cls' with a class token for
CLIP and timm's classifiers, 'map' without one for SigLIP).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

POOLS = ('cls', 'gap', 'map')
STEMS = ('patch', 'conv')


class ViT(nn.Module):
  """Vision Transformer encoder.

  Attributes:
    width: token width D (= output feature width).
    depth: number of transformer blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width (None: 4 * width).
    patch_size: spatial patch size p.
    stem: 'patch' (one p x p linear patch embedding, the standard ViT) or
      'conv' (images only: log2(p) 3x3 stride-2 convolutions with GELU, channels
      doubling up to `width`, then a 1x1 projection; Xiao et al. 2021, "Early
      convolutions help transformers see better": much faster to learn local
      structure such as shape on small images).
    tubelet: temporal patch size t for video input.
    channels: expected channel count C of the input.
    pool: 'cls' (class token), 'gap' (mean of tokens) or 'map'
      (multihead attention pooling with a learned probe).
    dropout: dropout on the embeddings and inside the blocks.
    attn_dropout: dropout on attention weights.
    drop_path: stochastic-depth rate of the last block (linear from 0).
    dtype: compute dtype (params stay float32).
    remat, scan_layers: see `layers.TransformerStack`.
    activation: the blocks' MLP activation: 'gelu_tanh' (default, big_vision),
      'gelu' (exact; timm) or 'quick_gelu' (OpenAI's CLIP).
    ln_eps: epsilon of every LayerNorm (1e-6; CLIP's is 1e-5).
    patch_bias: the patch embedding has a bias (CLIP's has none).
    pre_norm: a LayerNorm ('pre_norm') on the tokens, after the position
      embedding and before the blocks (CLIP's ln_pre).
  """
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: Any = None
  patch_size: int = 4
  stem: str = 'patch'
  tubelet: int = 2
  channels: int = 3
  pool: str = 'cls'
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  patch_bias: bool = True
  pre_norm: bool = False

  @property
  def output_width(self) -> int:
    return self.width

  def _check(self, x: jax.Array):
    layers.check_encoder_fields(self, POOLS)
    if x.ndim not in (4, 5):
      raise ValueError(
          f'ViT expects images [B,H,W,C] or videos [B,T,H,W,C]; got shape '
          f'{x.shape} (rank {x.ndim})')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'ViT expects float pixels; got dtype {x.dtype}')
    if x.shape[-1] != self.channels:
      raise ValueError(
          f'ViT expects {self.channels} channels (last axis); got shape '
          f'{x.shape}')
    height, width = x.shape[-3], x.shape[-2]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'image size {height}x{width} is not divisible by patch_size='
          f'{self.patch_size}')
    if self.stem not in STEMS:
      raise ValueError(f'stem={self.stem!r} is not one of {STEMS}')
    if self.stem == 'conv':
      if x.ndim != 4:
        raise ValueError(f"stem='conv' takes images [B,H,W,C]; got shape {x.shape}")
      if self.patch_size & (self.patch_size - 1):
        raise ValueError(f"stem='conv' needs a power-of-two patch_size; got "
                         f'{self.patch_size}')
    if x.ndim == 5 and x.shape[1] % self.tubelet:
      raise ValueError(
          f'video length {x.shape[1]} is not divisible by tubelet='
          f'{self.tubelet}')

  def _conv_stem(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, width] through log2(p) stride-2 convs."""
    num_convs = self.patch_size.bit_length() - 1
    for i in range(num_convs):
      channels = max(self.width >> (num_convs - i), 8)
      x = layers.Conv(channels, (3, 3), strides=(2, 2), padding='SAME',
                      dtype=self.dtype, name=f'stem_conv{i}')(x)
      x = nn.gelu(x)
    return layers.Conv(self.width, (1, 1), dtype=self.dtype, name='embedding')(x)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_tokens: bool = False):
    """Encodes images or videos.

    Args:
      x: float images [B, H, W, C] or videos [B, T, H, W, C]; H and W
        divisible by `patch_size`, T by `tubelet`.
      train: enables dropout and stochastic depth (rng stream 'dropout').
      return_tokens: also return the tokens after the blocks (see Returns).

    Returns:
      float32 features [B, width]; with `return_tokens`, (features, tokens
      float32 [B, N, width] (the class token first when pool='cls'), token mask
      bool [B, N], all True).
    """
    self._check(x)
    p = self.patch_size
    if self.stem == 'conv':
      x = self._conv_stem(x)
    else:
      kernel = (p, p) if x.ndim == 4 else (self.tubelet, p, p)
      x = layers.Conv(self.width, kernel, strides=kernel, padding='VALID',
                      dtype=self.dtype, use_bias=self.patch_bias, name='embedding')(x)
    batch = x.shape[0]
    grid = x.shape[1:-1]
    x = x.reshape(batch, -1, self.width)

    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width),
                       jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x],
          axis=1)
    num_tokens = x.shape[1]
    if self.has_variable('params', 'pos_embedding'):
      table_shape = self.get_variable('params', 'pos_embedding').shape
      if table_shape[1] != num_tokens:
        raise ValueError(
            f'input grid {grid} gives {num_tokens} tokens but the position '
            f'table was initialised for {table_shape[1]}; use the image size '
            f'(and video length) the model was initialised with')
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1, num_tokens, self.width), jnp.float32)
    x = x + pos.astype(x.dtype)
    if self.pre_norm:
      x = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='pre_norm')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    x = layers.encoder_stack(self, x, train=train)
    pooled = layers.pool_tokens(self, x)
    if return_tokens:
      return pooled, x.astype(jnp.float32), jnp.ones(x.shape[:2], bool)
    return pooled
