"""Multi-head attention with the parameter tree of flax's
`nn.MultiHeadDotProductAttention`, and the attention weights' computation
(`attention_core`: an einsum written here on CPU and TPU, `jax.nn.dot_product_attention`
on GPUs). `mmjax.models.layers` re-exports both."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The kernels' initialiser of every block (the ViT / big_vision convention).
DENSE_INIT = nn.initializers.xavier_uniform()


ATTENTION_IMPLS = ('auto', 'einsum', 'dot_product_attention')


def _flat_init(init, shape, in_axes: int):
  """`init` drawn on the [prod(in), prod(out)] matrix of a kernel `shape` whose
  first `in_axes` axes are its inputs, reshaped (what `nn.DenseGeneral` draws)."""
  def draw(rng, shape=shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:in_axes])), int(np.prod(shape[in_axes:])))
    return init(rng, flat, dtype).reshape(shape)
  return draw


class Projection(nn.Module):
  """One attention projection with `nn.DenseGeneral`'s params as
  `nn.MultiHeadDotProductAttention` lays them out ('kernel' [*in, *out], 'bias'
  [*out], drawn as DenseGeneral draws them): x [..., *in] -> [..., *out]."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_init: Any = DENSE_INIT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = len(self.in_shape)
    kernel = self.param('kernel', _flat_init(self.kernel_init, self.in_shape +
                                             self.out_shape, n))
    bias = self.param('bias', nn.initializers.zeros, self.out_shape)
    axes = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (axes, ((), ())))
    return y + bias.astype(self.dtype)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array,
                   mask: Optional[jax.Array], impl: str = 'auto',
                   dropout: Optional[tuple[float, jax.Array]] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) masked) v per head, the weights in float32.

  Args:
    q: [B, T, H, d]; k, v: [B, S, H, d].
    mask: bool broadcastable to [B, H, T, S] (True = may attend), or None.
    impl: 'einsum' (written here: heads moved in front, two batched matmuls;
      the fastest on the CPU), 'dot_product_attention' (`jax.nn.dot_product_attention`,
      which takes cuDNN's fused kernel on a GPU where it applies and XLA's
      otherwise) or 'auto' (the second on GPUs, the first elsewhere).
    dropout: (rate, rng) for dropout on the weights ('einsum' only), or None.

  Returns:
    [B, T, H, d] in q's dtype.
  """
  if impl == 'auto':
    impl = 'dot_product_attention' if jax.default_backend() == 'gpu' else 'einsum'
  if impl == 'dot_product_attention' and dropout is None:
    if mask is not None:
      mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  dtype = q.dtype
  q = (q * jnp.asarray(q.shape[-1] ** -0.5, dtype)).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum('bhtd,bhsd->bhts', q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    rate, rng = dropout
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - rate), 0.0)
  out = jnp.einsum('bhts,bhsd->bhtd', weights.astype(dtype), v)
  return out.transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head attention with the params of `nn.MultiHeadDotProductAttention`
  (query / key / value: 'kernel' [D, H, d], 'bias' [H, d]; out: 'kernel' [H, d, D],
  'bias' [D]), so checkpoints, converters and LoRA see the same tree.

  The weights are computed by `attention_core`.

  Attributes:
    num_heads: H (the width must be divisible by it).
    dtype: compute dtype.
    dropout_rate: dropout on the attention weights.
    kernel_init: initialiser of the four kernels (the biases start at zero).
    impl: see `attention_core`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Any = DENSE_INIT
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, deterministic: bool = True):
    """inputs_q [B, T, D], inputs_kv [B, S, D] (None: self-attention); mask
    broadcastable to [B, H, T, S]. Returns [B, T, D]."""
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention impl={self.impl!r} is not one of {ATTENTION_IMPLS}')
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads={self.num_heads}')
    heads = (self.num_heads, width // self.num_heads)
    kv = inputs_q if inputs_kv is None else inputs_kv
    q, k, v = (Projection((width,), heads, self.kernel_init, self.dtype, name=n)(a)
               for a, n in ((inputs_q, 'query'), (kv, 'key'), (kv, 'value')))
    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = (self.dropout_rate, self.make_rng('dropout'))
    y = attention_core(q, k, v, mask, self.impl, dropout)
    return Projection(heads, (width,), self.kernel_init, self.dtype, name='out')(y)
