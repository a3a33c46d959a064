"""Projection heads: encoder features -> the shared embedding width.

The head does not normalise; `MultimodalModel` L2-normalises its output.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_KINDS = ('linear', 'mlp', 'identity')


class ProjectionHead(nn.Module):
  """Maps features [B, F] to embeddings [B, embed_dim].

  Attributes:
    embed_dim: output width (the shared embedding space).
    kind: 'linear' (one matrix, no bias, as in CLIP: its `visual.proj` and
      `text_projection`), 'mlp' (Dense -> GELU -> Dense, as in SimCLR-style
      heads) or 'identity' (no parameters: the features already have width
      `embed_dim`, as in SigLIP, whose image tower has no projection and whose
      text tower carries its own, `TextTransformer.proj_dim`).
    hidden_dim: hidden width of the 'mlp' head (None: the input width).
    dropout: dropout on the hidden layer of the 'mlp' head.
    dtype: compute dtype (params stay float32).
  """
  embed_dim: int
  kind: str = 'linear'
  hidden_dim: Optional[int] = None
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False
               ) -> jax.Array:
    """features: [B, F] -> [B, embed_dim] in `dtype`."""
    if self.kind not in HEAD_KINDS:
      raise ValueError(
          f'unknown projection head kind {self.kind!r}; valid kinds: '
          f'{HEAD_KINDS}')
    if features.ndim != 2:
      raise ValueError(
          f'ProjectionHead expects features [B, F]; got shape '
          f'{features.shape}')
    if self.kind == 'identity':
      if features.shape[-1] != self.embed_dim:
        raise ValueError(
            f"projection head kind 'identity' needs features of width embed_dim="
            f'{self.embed_dim}; got width {features.shape[-1]} (set the '
            f"encoder's output width, or use head 'linear')")
      return features.astype(self.dtype)
    if self.kind == 'linear':
      return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                      name='proj')(features)
    hidden = self.hidden_dim or features.shape[-1]
    x = nn.Dense(hidden, dtype=self.dtype, name='hidden')(features)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.embed_dim, dtype=self.dtype, name='proj')(x)
