"""BERT-family text encoder over token ids (post-LayerNorm blocks).

What Hugging Face's `BertModel` computes, in flax: token + learned absolute
position + token type embeddings, a LayerNorm, then `depth` post-LN blocks
(x = LN(x + Attn(x)); x = LN(x + MLP(x))) with the exact (erf) GELU and
LayerNorm epsilon 1e-12, pooled by the mean over the attended tokens
(sentence-transformers' mean pooling), token 0 ('cls') or BERT's pooler
(tanh of a dense layer on token 0, 'pooler'). There is no final LayerNorm.

Token conventions follow `mmjax.models.text`: a token is attended to and
pooled when it is not `pad_id` and no earlier token is `eos_id` ([SEP] in a
WordPiece vocabulary, 102 for BERT's uncased one). For a single sentence
`[CLS] ... [SEP] [PAD] ...` that is exactly the attention mask a Hugging Face
tokenizer writes, so the mean covers [CLS], the words and [SEP]. Token types
are 0 unless `token_types` is given.

Parameter layout: 'token_embedding' (an `nn.Embed`), 'pos_embedding'
[max_len, width], 'type_embedding' [type_vocab_size, width], 'embed_norm';
the blocks under 'encoder' ('block_{i}', or 'blocks' with a leading depth
axis when scanned), each with 'attn' (query / key / value / out, flax's
`MultiHeadDotProductAttention`), 'ln_attn', 'mlp' (fc1, fc2) and 'ln_mlp';
'pooler' with pool='pooler'. `mmjax.pretrained.hf_bert` reads a Hugging Face
checkpoint into it.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers
from mmjax.models import text as text_lib

POOLS = ('mean', 'cls', 'pooler')
# The activations BERT-family checkpoints use (`layers.ACTIVATIONS`'s functions); BERT's
# 'gelu' is the exact one.
ACTIVATIONS = {name: layers.ACTIVATIONS[name] for name in ('gelu', 'gelu_tanh')}
_INIT = nn.initializers.normal(stddev=0.02)   # BERT's initializer_range


class _Mlp(nn.Module):
  """Dense (fc1) -> activation -> Dense (fc2), back to the input width."""
  mlp_dim: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_INIT, name='fc1')(x)
    y = ACTIVATIONS[self.activation](y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT, name='fc2')(y)


class BertBlock(nn.Module):
  """One post-LN block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  deterministic: bool = True
  scanned: bool = False
  activation: str = 'gelu'
  ln_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array]):
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_INIT,
        dropout_rate=self.attn_dropout, name='attn')(
            x, x, mask=mask, deterministic=self.deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='ln_attn')(x + y)
    y = _Mlp(self.mlp_dim, self.activation, self.dtype, name='mlp')(x)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='ln_mlp')(x + y)
    return (x, None) if self.scanned else x


class BertStack(nn.Module):
  """`depth` post-LN blocks (no final LayerNorm); `remat` and `scan_layers` as in
  `layers.TransformerStack`."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  activation: str = 'gelu'
  ln_eps: float = 1e-12
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    block_cls = BertBlock
    if self.remat:
      block_cls = nn.remat(BertBlock, prevent_cse=not self.scan_layers)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                  attn_dropout=self.attn_dropout, deterministic=not train,
                  activation=self.activation, ln_eps=self.ln_eps, dtype=self.dtype)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=nn.broadcast, length=self.depth)
      x, _ = scanned(scanned=True, name='blocks', **kwargs)(x, mask)
      return x
    for i in range(self.depth):
      x = block_cls(name=f'block_{i}', **kwargs)(x, mask)
    return x


class BertEncoder(nn.Module):
  """BERT-family encoder (module docstring); defaults: all-MiniLM-L6-v2's sizes.

  Attributes:
    vocab_size: number of token ids; inputs must lie in [0, vocab_size).
    max_len: size of the learned position table (BERT's max_position_embeddings).
    type_vocab_size: number of token types (segments).
    width, depth, num_heads: architecture (hidden_size, num_hidden_layers,
      num_attention_heads).
    mlp_dim: MLP hidden width (intermediate_size; None: 4 * width).
    pool: 'mean' (over the attended tokens), 'cls' (token 0) or 'pooler'
      (tanh(Dense(token 0)), BERT's pooler output).
    pad_id, eos_id: token conventions (module docstring).
    activation: 'gelu' (exact, BERT's) or 'gelu_tanh'.
    ln_eps: LayerNorm epsilon.
    dropout, attn_dropout: hidden and attention-probability dropout rates.
    drop_path: kept at 0 (BERT has no stochastic depth); a field so that the checks
      every transformer encoder shares apply.
    dtype: compute dtype (params stay float32).
    remat, scan_layers: see `layers.TransformerStack`.
  """
  vocab_size: int = 30522
  max_len: int = 512
  type_vocab_size: int = 2
  width: int = 384
  depth: int = 6
  num_heads: int = 12
  mlp_dim: Any = 1536
  pool: str = 'mean'
  pad_id: int = 0
  eos_id: int = 102
  activation: str = 'gelu'
  ln_eps: float = 1e-12
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @property
  def output_width(self) -> int:
    return self.width

  def _check(self, tokens: jax.Array, token_types):
    layers.check_encoder_fields(self, POOLS)
    if self.drop_path:
      raise ValueError(f'drop_path={self.drop_path}: BERT blocks have no stochastic '
                       'depth; leave it 0')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r} is not one of '
                       f'{tuple(ACTIVATIONS)}')
    if not self.ln_eps > 0:
      raise ValueError(f'ln_eps={self.ln_eps} must be > 0')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by '
                       f'num_heads={self.num_heads}')
    for name in ('pad_id', 'eos_id'):
      value = getattr(self, name)
      if not 0 <= value < self.vocab_size:
        raise ValueError(
            f'{name}={value} is outside the vocabulary [0, {self.vocab_size})')
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'BERT encoder expects integer token ids [B, L]; got shape '
                       f'{tokens.shape} and dtype {tokens.dtype}')
    if tokens.shape[1] > self.max_len:
      raise ValueError(f'token sequence length {tokens.shape[1]} exceeds the position '
                       f'table max_len={self.max_len}')
    if token_types is not None and token_types.shape != tokens.shape:
      raise ValueError(f'token_types has shape {token_types.shape}, the tokens '
                       f'{tokens.shape}')
    for name, ids, size in (('token ids', tokens, self.vocab_size),
                            ('token types', token_types, self.type_vocab_size)):
      if ids is not None and layers.is_concrete(ids) and ids.size:
        values = np.asarray(ids)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= size:
          raise ValueError(f'{name} must lie in [0, {size}); got range [{low}, {high}]')

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False,
               token_types: Optional[jax.Array] = None, return_tokens: bool = False):
    """Encodes token ids int [B, L] (L <= max_len) into float32 features [B, width].

    `token_types` (int [B, L], default zeros) picks each token's type embedding.
    `train` enables dropout (rng stream 'dropout'). Under jit, ids outside the
    vocabulary turn their example's features into NaN (as in `mmjax.models.text`).
    `return_tokens`: return (features, tokens float32 [B, L, width], valid-token
    mask bool [B, L]).

    Raises:
      ValueError: bad rank or dtype, a sequence longer than `max_len`, concrete ids
        outside the vocabulary, or bad module fields.
    """
    self._check(tokens, token_types)
    length = tokens.shape[1]
    valid = text_lib.valid_tokens(tokens, self.pad_id, self.eos_id)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=_INIT, dtype=self.dtype,
                 name='token_embedding')(tokens)
    in_vocab = (tokens >= 0) & (tokens < self.vocab_size)
    x = jnp.where(in_vocab[..., None], x, jnp.asarray(jnp.nan, x.dtype))
    pos = self.param('pos_embedding', _INIT, (self.max_len, self.width), jnp.float32)
    types = self.param('type_embedding', _INIT, (self.type_vocab_size, self.width),
                       jnp.float32)
    type_rows = (types[0][None, None] if token_types is None
                 else jnp.take(types, token_types, axis=0))
    x = x + pos[:length].astype(x.dtype)[None] + type_rows.astype(x.dtype)
    x = nn.LayerNorm(self.ln_eps, dtype=self.dtype, name='embed_norm')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = BertStack(self.depth, self.num_heads, self.mlp_dim or 4 * self.width,
                  dropout=self.dropout, attn_dropout=self.attn_dropout,
                  activation=self.activation, ln_eps=self.ln_eps, dtype=self.dtype,
                  remat=self.remat, scan_layers=self.scan_layers, name='encoder')(
                      x, layers.padding_attention_mask(valid, causal=False), train=train)
    if self.pool == 'mean':
      out = layers.masked_mean(x, valid)
    elif self.pool == 'cls':
      out = x[:, 0]
    else:
      out = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, kernel_init=_INIT,
                              name='pooler')(x[:, 0]))
    if return_tokens:
      return out.astype(jnp.float32), x.astype(jnp.float32), valid
    return out.astype(jnp.float32)
