"""Transformer building blocks shared by every mmjax encoder.

All blocks are pre-LayerNorm (as in ViT, CLIP and AST). Compute runs in
`dtype` (e.g. bfloat16) while parameters stay in float32. The MLP activation
(`ACTIVATIONS`) and the LayerNorm epsilon are fields, so that a block computes
exactly what a published checkpoint was trained with: the defaults
('gelu_tanh', 1e-6) are big_vision's; timm's ViTs use 'gelu' (exact erf) and
1e-6, OpenAI's CLIP 'quick_gelu' and 1e-5.

The block stack (`TransformerStack`) has two performance switches:

- `remat`: each block is wrapped in `nn.remat`, so its activations are
  recomputed in the backward pass instead of stored.
- `scan_layers`: the blocks are one `nn.scan` over a stacked parameter tree,
  so the block is traced and compiled once whatever the depth.

Parameter layouts: unscanned, block i lives under `block_{i}`; scanned, all
blocks live under `blocks` with a leading depth axis on every leaf.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.array_util import is_concrete, masked_mean  # noqa: F401  (re-exported)
# The attention layer and the kernels' initialiser (DENSE_INIT) live in
# `mmjax.models.attention`; re-exported here.
from mmjax.models.attention import (  # noqa: F401
    ATTENTION_IMPLS, DENSE_INIT, Attention, Projection, attention_core)

Dtype = Any

BIAS_INIT = nn.initializers.normal(stddev=1e-6)


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


# name -> function: 'gelu' is the exact (erf) GELU, 'gelu_tanh' its tanh
# approximation (flax's `nn.gelu` default), 'quick_gelu' OpenAI CLIP's.
ACTIVATIONS = {
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'quick_gelu': quick_gelu,
}


def activation_fn(name: str):
  """The function of an activation name; an unknown name lists the valid ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f'activation={name!r} is not one of {tuple(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zeroes whole examples of a residual branch.

  Args:
    x: residual branch output [B, ...].
    rate: probability of dropping the branch for one example (a Python float
      or a scalar array, so scanned stacks can feed one rate per layer).
    rng: PRNG key.

  Returns:
    `x` with each example kept with probability 1 - rate and scaled by
    1 / (1 - rate), so the expectation is unchanged.
  """
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  kept = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  # keep is > 0 whenever a branch can be kept; guard the division for rate=1.
  scale = jnp.where(keep > 0, 1.0 / jnp.maximum(keep, 1e-6), 0.0)
  return jnp.where(kept, x * scale.astype(x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
  """Two-layer MLP: [..., D] -> [..., mlp_dim] -> [..., D], `activation` between."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=DENSE_INIT,
                 bias_init=BIAS_INIT, name='fc1')(x)
    y = activation_fn(self.activation)(y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return nn.Dense(width, dtype=self.dtype, kernel_init=DENSE_INIT,
                    bias_init=BIAS_INIT, name='fc2')(y)


class EncoderBlock(nn.Module):
  """One pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads (width must be divisible by it).
    mlp_dim: hidden width of the MLP.
    dropout: dropout rate on the attention output and inside/after the MLP.
    attn_dropout: dropout rate on the attention weights.
    use_drop_path: apply stochastic depth with the per-call `rate`.
    deterministic: disables dropout and stochastic depth (eval mode).
    scanned: return `(x, None)` as `nn.scan` expects a (carry, out) pair.
    dtype: compute dtype.
    activation: the MLP's activation (`ACTIVATIONS`).
    ln_eps: epsilon of both LayerNorms.
    attention: how the attention weights are computed (`attention_core`'s impl).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  use_drop_path: bool = False
  deterministic: bool = True
  scanned: bool = False
  dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array], rate):
    """Applies the block.

    Args:
      x: tokens [B, L, D].
      mask: attention mask broadcastable to [B, heads, L, L] (True = may
        attend), or None.
      rate: stochastic-depth rate of this block (float or scalar array).

    Returns:
      [B, L, D] (or `([B, L, D], None)` when `scanned`).
    """
    y = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='ln_attn')(x)
    y = Attention(self.num_heads, self.dtype, self.attn_dropout, impl=self.attention,
                  name='attn')(y, mask=mask, deterministic=self.deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    if self.use_drop_path and not self.deterministic:
      y = drop_path(y, rate, self.make_rng('dropout'))
    x = x + y

    y = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='ln_mlp')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation,
                 name='mlp')(y, self.deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    if self.use_drop_path and not self.deterministic:
      y = drop_path(y, rate, self.make_rng('dropout'))
    x = x + y
    return (x, None) if self.scanned else x


class TransformerStack(nn.Module):
  """`depth` encoder blocks followed by a final LayerNorm.

  Stochastic depth grows linearly from 0 at the first block to `drop_path`
  at the last one.

  Attributes:
    depth, num_heads, mlp_dim: architecture.
    dropout, attn_dropout, drop_path: regularisation rates.
    dtype: compute dtype (params stay float32).
    remat: recompute each block's activations in the backward pass.
    scan_layers: one `nn.scan` over the blocks (flat compile time in depth).
    activation, ln_eps: the blocks' MLP activation and LayerNorm epsilon (also
      the final LayerNorm's).
    attention: `attention_core`'s impl ('auto': `jax.nn.dot_product_attention`
      on GPUs, the einsum formulation elsewhere).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, *,
               train: bool = False) -> jax.Array:
    """Runs the blocks on tokens [B, L, D]; returns normalised [B, L, D]."""
    if x.shape[-1] % self.num_heads:
      raise ValueError(
          f'width {x.shape[-1]} is not divisible by num_heads={self.num_heads}')
    block_cls = EncoderBlock
    if self.remat:
      # Inside scan the loop body already blocks CSE across iterations.
      block_cls = nn.remat(EncoderBlock, prevent_cse=not self.scan_layers)
    block_kwargs = dict(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
        attn_dropout=self.attn_dropout, use_drop_path=self.drop_path > 0,
        deterministic=not train, dtype=self.dtype, activation=self.activation,
        ln_eps=self.ln_eps, attention=self.attention)
    rates = np.linspace(0.0, self.drop_path, self.depth, dtype=np.float32)
    if self.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={'params': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, 0), length=self.depth)
      x, _ = scanned(scanned=True, name='blocks', **block_kwargs)(
          x, mask, jnp.asarray(rates))
    else:
      for i in range(self.depth):
        x = block_cls(name=f'block_{i}', **block_kwargs)(
            x, mask, float(rates[i]))
    return nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='encoder_norm')(x)


def encoder_stack(encoder: nn.Module, x: jax.Array, mask=None, *,
                  train: bool) -> jax.Array:
  """The `TransformerStack` of an encoder module, built from its own fields
  (depth, num_heads, mlp_dim or 4 * width, dropout rates, dtype, remat,
  scan_layers, activation and ln_eps when it has them) and named 'encoder'.
  Call it inside the encoder's compact `__call__`, so the stack is the
  encoder's submodule."""
  return TransformerStack(
      depth=encoder.depth, num_heads=encoder.num_heads,
      mlp_dim=encoder.mlp_dim or 4 * encoder.width, dropout=encoder.dropout,
      attn_dropout=encoder.attn_dropout, drop_path=encoder.drop_path,
      dtype=encoder.dtype, remat=encoder.remat, scan_layers=encoder.scan_layers,
      activation=getattr(encoder, 'activation', 'gelu_tanh'),
      ln_eps=getattr(encoder, 'ln_eps', 1e-6),
      attention=getattr(encoder, 'attention', 'auto'), name='encoder')(x, mask, train=train)


def pool_tokens(encoder: nn.Module, x: jax.Array, valid=None) -> jax.Array:
  """float32 [B, width]: `encoder.pool` of tokens [B, N, width]: 'cls' (token 0),
  'gap' / 'mean' (mean over the `valid` tokens, all when None) or 'map' (a
  `MAPHead` named 'map_head'). Call it inside the encoder's compact `__call__`."""
  if encoder.pool == 'cls':
    out = x[:, 0]
  elif encoder.pool in ('gap', 'mean'):
    out = x.mean(axis=1) if valid is None else masked_mean(x, valid)
  else:
    out = MAPHead(encoder.num_heads, encoder.mlp_dim or 4 * encoder.width,
                  encoder.dtype, getattr(encoder, 'activation', 'gelu_tanh'),
                  getattr(encoder, 'ln_eps', 1e-6), name='map_head')(x, valid)
  return out.astype(jnp.float32)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens.

  [B, L, D] -> [B, D]. The probe's attention output gets a residual MLP
  (pre-LN), as in the attention-pooling heads of SigLIP/big_vision.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """x: [B, L, D]; mask: [B, L] bool (True = token may be attended)."""
    batch, _, width = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
    attn_mask = None if mask is None else mask[:, None, None, :]
    y = Attention(self.num_heads, self.dtype, impl=self.attention, name='attn')(
        probe, x, mask=attn_mask)
    z = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='ln')(y)
    y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation,
                     name='mlp')(z, True)
    return y[:, 0]


def padding_attention_mask(valid: jax.Array, causal: bool) -> jax.Array:
  """Builds an attention mask from per-token validity.

  Args:
    valid: [B, L] bool, True for tokens that may be attended to.
    causal: also forbid attending to later positions.

  Returns:
    [B, 1, L, L] bool, True where query i may attend to key j.
  """
  mask = jnp.broadcast_to(valid[:, None, None, :],
                          (valid.shape[0], 1, valid.shape[1], valid.shape[1]))
  if causal:
    length = valid.shape[1]
    mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
  return mask


def check_encoder_fields(encoder, pools) -> None:
  """The fields every transformer encoder shares: `pool` among `pools`, its
  dropout, attention-dropout and drop-path rates in [0, 1), its activation
  name and a positive LayerNorm epsilon."""
  if encoder.pool not in pools:
    raise ValueError(f'pool={encoder.pool!r} is not one of {pools}')
  activation_fn(getattr(encoder, 'activation', 'gelu_tanh'))
  eps = getattr(encoder, 'ln_eps', 1e-6)
  if not eps > 0:
    raise ValueError(f'ln_eps={eps} must be > 0')
  check_dropout_rates(dropout=encoder.dropout, attn_dropout=encoder.attn_dropout,
                      drop_path=encoder.drop_path)


def check_dropout_rates(**rates):
  """Raises ValueError for a rate outside [0, 1)."""
  for name, rate in rates.items():
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'{name}={rate} must be in [0, 1)')


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """SAME padding (low, high) of one spatial axis, as XLA and flax place it."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def extract_patches(x: jax.Array, kernel: tuple[int, ...], strides: tuple[int, ...],
                    padding: str) -> jax.Array:
  """[B, *spatial, C] -> [B, *out, prod(kernel), C]: every window a convolution with
  `kernel`, `strides` and 'SAME' or 'VALID' `padding` would see, in kernel order.

  Non-overlapping windows (strides == kernel, VALID) are a reshape; others one strided
  slice per kernel offset. Both are copies, so the gradient of a convolution written
  with them is exact adds in a fixed order (see `Conv`).
  """
  nd = len(kernel)
  spatial = x.shape[1:1 + nd]
  if padding == "SAME":
    x = jnp.pad(x, [(0, 0)] + [_same_padding(n, k, s) for n, k, s in
                               zip(spatial, kernel, strides)] + [(0, 0)])
  elif padding != "VALID":
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
  padded = x.shape[1:1 + nd]
  out = [(n - k) // s + 1 for n, k, s in zip(padded, kernel, strides)]
  if tuple(kernel) == tuple(strides):
    x = x[(slice(None),) + tuple(slice(0, o * k) for o, k in zip(out, kernel))]
    shape = [x.shape[0]]
    for o, k in zip(out, kernel):
      shape += [o, k]
    x = x.reshape(shape + [x.shape[-1]])
    # [B, o1, k1, o2, k2, ..., C] -> [B, o1, o2, ..., k1, k2, ..., C]
    order = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [2 * nd + 1]
    x = x.transpose(order)
    return x.reshape(x.shape[:1 + nd] + (-1, x.shape[-1]))
  windows = []
  for offset in np.ndindex(*kernel):
    index = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides))
    windows.append(x[(slice(None),) + index])
  return jnp.stack(windows, axis=-2)


class Conv(nn.Module):
  """A strided convolution with `nn.Conv`'s parameters ('kernel' [*kernel_size, C, F],
  'bias' [F] unless `use_bias=False`) and initialisers, computed as patch extraction
  and one einsum.

  The same function as `nn.Conv`; written this way because XLA's CPU convolution
  sums its backward pass in an order that depends on the size of the host's thread
  pool (so on how many devices a process simulates), while a matmul and the copies of
  `extract_patches` do not: the gradient is then the same bits on 1 x 8 and 2 x 4
  simulated devices. Meant for stems (few, large strides), where it is as fast.
  """
  features: int
  kernel_size: tuple[int, ...]
  strides: Optional[tuple[int, ...]] = None
  padding: str = "SAME"
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    strides = tuple(self.strides or (1,) * len(kernel_size))
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        kernel_size + (x.shape[-1], self.features), jnp.float32)
    patches = extract_patches(x.astype(self.dtype), kernel_size, strides, self.padding)
    kernel = kernel.reshape(-1, x.shape[-1], self.features).astype(self.dtype)
    y = jnp.einsum("...kc,kcf->...f", patches, kernel)
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y + bias.astype(self.dtype)
