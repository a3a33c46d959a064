"""Attention fusion over modality tokens: a transformer, and One-Versus-Others.

Each modality's [B, D] feature is one token. Absent tokens are zero-filled
and excluded as keys, so present tokens never attend to them, and pooling
runs over present tokens only. Training randomness uses the 'dropout' rng.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.fusion import common

Array = jax.Array


class ModalityEmbedding(nn.Module):
  """Adds a learned modality-type embedding to each token: [B, M, D] -> same."""

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    _, num_modalities, width = tokens.shape
    table = self.param("embedding", nn.initializers.normal(0.02),
                       (num_modalities, width))
    return tokens + table.astype(tokens.dtype)[None]


class MaskedSelfAttention(nn.Module):
  """Pre-LayerNorm residual self-attention over tokens with absent keys masked.

  Attributes:
    num_heads: attention heads (must divide D).
    dropout_rate: dropout on attention weights and output (training only).
  """
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: Array, key_present: Array, train: bool = False) -> Array:
    """tokens [B, M, D], key_present bool [B, M] -> [B, M, D]."""
    width = tokens.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"feature width D={width} is not divisible by "
                       f"num_heads={self.num_heads}")
    h = nn.LayerNorm(name="norm")(tokens)
    # [B, 1, 1, M]: every query (and head) sees only present keys. A row with
    # no present key (only possible under jit) softmaxes over finite big
    # negatives: uniform weights, no NaN.
    attn_mask = key_present[:, None, None, :]
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=not train, name="attention")(h, h, mask=attn_mask)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return tokens + h


class FeedForward(nn.Module):
  """Pre-LayerNorm residual MLP block: [..., D] -> [..., D]."""
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: Array, train: bool = False) -> Array:
    h = nn.LayerNorm(name="norm")(tokens)
    h = nn.gelu(nn.Dense(self.mlp_dim, name="hidden")(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.Dense(tokens.shape[-1], name="out")(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return tokens + h


def _check_transformer_config(kind: str, num_layers: int, num_heads: int,
                              dropout_rate: float) -> None:
  if num_layers < 1:
    raise ValueError(f"{kind} num_layers must be >= 1, got {num_layers}")
  if num_heads < 1:
    raise ValueError(f"{kind} num_heads must be >= 1, got {num_heads}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{kind} dropout_rate must be in [0, 1), got {dropout_rate}")


class AttentionFusion(nn.Module):
  """Transformer over modality tokens, pooled over present tokens.

  tokens = features + modality-type embedding -> num_layers x (masked
  self-attention, MLP) -> LayerNorm -> mean over present tokens -> optional
  projection to out_dim.

  Attributes:
    num_layers: transformer blocks.
    num_heads: attention heads (must divide D).
    mlp_dim: hidden width of the MLP blocks (default 2 * D).
    dropout_rate: dropout in attention and MLPs (training only).
    out_dim: output width (default: D, no projection).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int | None = None
  dropout_rate: float = 0.0
  out_dim: int | None = None
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("attention", self.num_layers, self.num_heads,
                              self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim or D] and aux {'stats/num_present'}."""
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    width = x.shape[-1]
    tokens = ModalityEmbedding(name="modality_embedding")(x)
    for i in range(self.num_layers):
      tokens = MaskedSelfAttention(self.num_heads, self.dropout_rate,
                                   name=f"attention_{i}")(tokens, present, train)
      tokens = FeedForward(self.mlp_dim or 2 * width, self.dropout_rate,
                           name=f"mlp_{i}")(tokens, train)
    tokens = nn.LayerNorm(name="final_norm")(tokens)
    joint = common.masked_mean(tokens, present)
    if self.out_dim is not None:
      joint = nn.Dense(self.out_dim, name="out")(joint)
    aux = {"stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32))}
    return joint, aux


class OvOFusion(nn.Module):
  """One-Versus-Others (OvO) attention fusion (Golovanevsky et al., 2024).

  OvO runs n attention operations for n modalities: modality i attends to the
  *others* through one weight matrix W shared by all modalities (per head),
  score(i, j) = q_i^T W k_j / sqrt(d_head), with keys/values of the present
  modalities j != i only. The n outputs are concatenated (zero-filled where
  the modality is absent, plus presence bits) and projected, as in the paper.

  In the paper each modality is a token sequence and the query is the mean of
  the other modalities, attending over the main modality's tokens. Here every
  modality is a single [B, D] token, for which that softmax over one token is
  the identity; so the main modality is the query and the softmax runs over
  the others instead, which keeps the one-vs-others structure and the shared
  W. A modality with no present other gets a zero context (its own features
  still reach the output through the residual).

  Attributes:
    num_heads: attention heads (must divide D).
    dropout_rate: dropout on attention weights (training only).
    out_dim: output width (default: D).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  num_heads: int = 2
  dropout_rate: float = 0.0
  out_dim: int | None = None
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("ovo", 1, self.num_heads, self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim or D] and aux {'stats/num_present', ...}."""
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    batch, num_modalities, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"feature width D={width} is not divisible by "
                       f"num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    tokens = ModalityEmbedding(name="modality_embedding")(x)
    h = nn.LayerNorm(name="norm")(tokens)
    split = lambda t: t.reshape(batch, num_modalities, self.num_heads, head_dim)
    query = split(nn.Dense(width, name="query")(h))
    key = split(nn.Dense(width, name="key")(h))
    value = split(nn.Dense(width, name="value")(h))
    shared_w = self.param("shared_w", nn.initializers.normal(head_dim ** -0.5),
                          (self.num_heads, head_dim, head_dim))
    scores = jnp.einsum("bihd,hde,bjhe->bhij", query, shared_w.astype(h.dtype),
                        key) / jnp.sqrt(head_dim).astype(h.dtype)
    others = present[:, None, :] & ~jnp.eye(num_modalities, dtype=bool)[None]
    allowed = others[:, None]  # [B, 1, M(query), M(key)]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(allowed, weights, 0)  # no present other -> zero context
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    context = jnp.einsum("bhij,bjhd->bihd", weights, value)
    context = nn.Dense(width, name="context_out")(
        context.reshape(batch, num_modalities, width))
    attended = nn.LayerNorm(name="out_norm")(tokens + context)
    attended = jnp.where(present[..., None], attended, 0)
    joint = nn.Dense(self.out_dim or width, name="out")(jnp.concatenate(
        [attended.reshape(batch, num_modalities * width),
         present.astype(attended.dtype)], axis=-1))
    aux = {"stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32))}
    return joint, aux
