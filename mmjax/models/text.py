"""Text transformer over token ids (CLIP's text tower and smaller ones).

Token conventions are module fields: `pad_id` marks padding and `eos_id`
ends a sequence. A token takes part in attention and pooling when it is not
padding and no earlier token is `eos_id`; so anything written after the
first eos, or in the padding, never changes the output. The defaults are
the project's byte tokenizer (pad 0, bos 1, eos 2, bytes 3..258, vocabulary
259); for CLIP's BPE vocabulary pass `eos_id=49407`.

Token ids outside [0, vocab_size) are a ValueError when the ids are concrete
(eager calls, `init` on a real batch). Inside `jit` their values are not
known at trace time; there an out-of-vocabulary id (negative ones included,
which an embedding lookup would otherwise wrap to the end of the table)
turns its example's features into NaN, which the trainer's non-finite check
reports, instead of silently reading another token's embedding.

Published text towers: CLIP's is causal, pools the position of the largest
token id (`pool='argmax'`: its eos, 49407, is the largest id) and attends to
every earlier token, padding included (`mask_padding=False`; causal attention
keeps what follows the eos out of it); SigLIP's is bidirectional, attends to
every token and pools the final position (`pool='final'`), then projects with
a biased matrix (`proj_dim`, `proj_bias`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

POOLS = ('eos', 'last', 'first', 'mean', 'argmax', 'final')


def valid_tokens(tokens: jax.Array, pad_id: int, eos_id: int) -> jax.Array:
  """[B, L] bool: not padding, and no eos strictly before the position."""
  is_eos = tokens == eos_id
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  return (tokens != pad_id) & (eos_before == 0)


class TextTransformer(nn.Module):
  """Transformer text encoder.

  Attributes:
    vocab_size: number of token ids; inputs must lie in [0, vocab_size).
    max_len: size of the learned position table (longest input).
    width, depth, num_heads: architecture.
    mlp_dim: MLP hidden width (None: 4 * width).
    causal: causal attention (CLIP) or bidirectional.
    pool: 'eos'/'last' (the last valid token, i.e. the first eos when the
      sequence has one), 'first' (position 0), 'mean' (over valid tokens),
      'argmax' (the first position of the largest token id: OpenAI's CLIP) or
      'final' (the last position, L - 1, whatever it holds: SigLIP).
    pad_id, eos_id: token conventions (see the module docstring).
    dropout, attn_dropout, drop_path: regularisation rates.
    dtype: compute dtype (params stay float32).
    remat, scan_layers: see `layers.TransformerStack`.
    activation, ln_eps: the blocks' MLP activation and LayerNorm epsilon
      (see `layers`; CLIP: 'quick_gelu' and 1e-5).
    mask_padding: True: padding and what follows the first eos are masked out
      of attention and pooling; False: every token is valid (what CLIP and
      SigLIP compute; `pad_id` and `eos_id` are then unused).
    proj_dim: when set, a Dense layer ('head') maps the pooled token to this
      width (SigLIP's text head); the output width is then `proj_dim`.
    proj_bias: that layer has a bias.
  """
  vocab_size: int = 259
  max_len: int = 128
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: Any = None
  causal: bool = True
  pool: str = 'eos'
  pad_id: int = 0
  eos_id: int = 2
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  mask_padding: bool = True
  proj_dim: Any = None
  proj_bias: bool = False

  @property
  def output_width(self) -> int:
    return self.proj_dim or self.width

  def _check(self, tokens: jax.Array):
    layers.check_encoder_fields(self, POOLS)
    for name in ('pad_id', 'eos_id'):
      value = getattr(self, name)
      if not 0 <= value < self.vocab_size:
        raise ValueError(
            f'{name}={value} is outside the vocabulary [0, {self.vocab_size})')
    if tokens.ndim != 2:
      raise ValueError(
          f'text encoder expects token ids [B, L]; got shape {tokens.shape}')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f'text encoder expects integer token ids; got dtype {tokens.dtype}')
    if tokens.shape[1] > self.max_len:
      raise ValueError(
          f'token sequence length {tokens.shape[1]} exceeds the position '
          f'table max_len={self.max_len}')
    if layers.is_concrete(tokens) and tokens.size:
      values = np.asarray(tokens)
      low, high = int(values.min()), int(values.max())
      if low < 0 or high >= self.vocab_size:
        raise ValueError(
            f'token ids must lie in [0, {self.vocab_size}); got range '
            f'[{low}, {high}]')

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False,
               return_tokens: bool = False):
    """Encodes token ids.

    Args:
      tokens: int [B, L] with L <= max_len.
      train: enables dropout and stochastic depth (rng stream 'dropout').
      return_tokens: also return the token sequence after the blocks.

    Returns:
      float32 features [B, width] (NaN rows for out-of-vocabulary ids under
      jit, see the module docstring); with `return_tokens`, (features, tokens
      float32 [B, L, width] (before any `proj_dim` head), the valid-token mask
      bool [B, L]).

    Raises:
      ValueError: bad rank or dtype, a sequence longer than `max_len`,
        concrete ids outside the vocabulary, or bad module fields.
    """
    self._check(tokens)
    length = tokens.shape[1]
    if self.mask_padding:
      valid = valid_tokens(tokens, self.pad_id, self.eos_id)
    else:
      valid = jnp.ones(tokens.shape, bool)
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.initializers.normal(stddev=0.02),
                 dtype=self.dtype, name='token_embedding')(tokens)
    # Traced ids skip the range check in `_check`: see the module docstring.
    in_vocab = (tokens >= 0) & (tokens < self.vocab_size)
    x = jnp.where(in_vocab[..., None], x, jnp.asarray(jnp.nan, x.dtype))
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.01),
                     (self.max_len, self.width), jnp.float32)
    x = x + pos[:length].astype(x.dtype)[None]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    mask = layers.padding_attention_mask(valid, self.causal)
    x = layers.encoder_stack(self, x, mask, train=train)

    if self.pool in ('eos', 'last'):
      positions = jnp.arange(length)[None, :]
      last = jnp.max(jnp.where(valid, positions, 0), axis=1)
      out = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.pool == 'first':
      out = x[:, 0]
    elif self.pool == 'argmax':
      out = jnp.take_along_axis(
          x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
    elif self.pool == 'final':
      out = x[:, -1]
    else:
      out = layers.masked_mean(x, valid)
    if self.proj_dim:
      out = nn.Dense(self.proj_dim, use_bias=self.proj_bias, dtype=self.dtype,
                     kernel_init=layers.DENSE_INIT, name='head')(out)
    if return_tokens:
      return out.astype(jnp.float32), x.astype(jnp.float32), valid
    return out.astype(jnp.float32)
