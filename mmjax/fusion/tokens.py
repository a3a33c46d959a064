"""Fusion over token sequences: attention bottlenecks (MBT), co-attention (ViLBERT),
a single-stream transformer (VL-BERT) and One-Versus-Others attention over tokens.

Every module here has `needs_tokens = True`, so a model holding it asks its encoders
for their token sequences, and is called as

  joint, aux = module(tokens, token_mask, mask, train=...)

  tokens      dict modality -> float [B, T_m, D]  (one width D; T_m may differ)
  token_mask  dict modality -> bool  [B, T_m]     (True = a valid token)
  mask        dict modality -> bool  [B]          (True = modality present)

A token is used only where it is valid *and* its modality is present: the two masks
are combined first and every other token is replaced by zero with `jnp.where`, and
is never a key of any attention, so whatever an absent modality's input held cannot
change the output. Training randomness uses the 'dropout' rng.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.fusion import common
from mmjax.fusion.attention import (FeedForward, MaskedSelfAttention,
                                    _check_transformer_config)
from mmjax.fusion.heads import TaskHead

Array = jax.Array


def stack_token_inputs(tokens: Mapping[str, Array], token_mask: Mapping[str, Array],
                       mask: Mapping[str, Array], modalities: Sequence[str] | None = None
                       ) -> tuple[tuple[str, ...], dict, dict, Array]:
  """Checks the inputs of a token-level fusion module.

  Returns:
    (names, tokens, valid, present): sorted modality names; tokens dict with every
    unusable token exactly zero; valid dict modality -> bool [B, T_m] (valid token of
    a present modality); present bool [B, M].

  Raises:
    ValueError: keys that disagree, bad shapes or dtypes, tokens of different widths,
      or (concrete masks) a sample with no modality present.
  """
  names = common.modality_names(tokens, mask, modalities)
  if set(token_mask) != set(names):
    raise ValueError(f"token_mask has modalities {sorted(token_mask)}, tokens "
                     f"{list(names)}")
  widths = {}
  for m in names:
    shape, mshape = jnp.shape(tokens[m]), jnp.shape(token_mask[m])
    if len(shape) != 3 or mshape != shape[:2]:
      raise ValueError(f"tokens[{m!r}] must be [B, T, D] and token_mask[{m!r}] [B, T]; "
                       f"got {shape} and {mshape}")
    if not jnp.issubdtype(jnp.asarray(tokens[m]).dtype, jnp.floating):
      raise ValueError(f"tokens[{m!r}] must be floating point, got "
                       f"{jnp.asarray(tokens[m]).dtype}")
    if jnp.asarray(token_mask[m]).dtype != jnp.bool_:
      raise ValueError(f"token_mask[{m!r}] must be bool, got "
                       f"{jnp.asarray(token_mask[m]).dtype}")
    widths[m] = shape[-1]
  if len(set(widths.values())) > 1:
    raise ValueError(f"token-level fusion needs tokens of one width, got widths "
                     f"{widths}; set the fusion config's 'width' to project them")
  present = common.stack_mask(mask, names)
  batches = {m: jnp.shape(tokens[m])[0] for m in names}
  if len(set(batches.values())) > 1 or present.shape[0] != batches[names[0]]:
    raise ValueError(f"tokens have batch sizes {batches}, the mask {present.shape[0]}")
  common.check_mask(mask)
  valid = {m: jnp.asarray(token_mask[m]) & present[:, i, None]
           for i, m in enumerate(names)}
  tokens = {m: jnp.where(valid[m][..., None], tokens[m], jnp.zeros((), tokens[m].dtype))
            for m in names}
  return names, tokens, valid, present


def masked_token_mean(tokens: Array, valid: Array) -> Array:
  """Mean of the valid tokens: [B, T, D], bool [B, T] -> [B, D] (0 with none valid)."""
  return common.masked_mean(tokens, valid)


def _num_present(present: Array) -> dict[str, Array]:
  return {"stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32))}


class Block(nn.Module):
  """One pre-LayerNorm transformer block (masked self-attention, MLP): [B, N, D]."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, valid: Array, train: bool = False) -> Array:
    x = MaskedSelfAttention(self.num_heads, self.dropout_rate, name="attention")(
        x, valid, train)
    return FeedForward(self.mlp_dim, self.dropout_rate, name="mlp")(x, train)


class MaskedCrossAttention(nn.Module):
  """Pre-LayerNorm residual attention of queries [B, Nq, D] over keys [B, Nk, D].

  Keys with `key_valid` False are never attended; a query row with no valid key gets
  a zero update (it keeps its input).
  """
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, queries: Array, keys: Array, key_valid: Array,
               train: bool = False) -> Array:
    width = queries.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"token width D={width} is not divisible by "
                       f"num_heads={self.num_heads}")
    q = nn.LayerNorm(name="query_norm")(queries)
    kv = nn.LayerNorm(name="key_norm")(keys)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=not train, name="attention")(q, kv, mask=key_valid[:, None, None, :])
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    has_key = jnp.any(key_valid, axis=1)[:, None, None]
    return queries + jnp.where(has_key, h, 0)


def _check_positive(kind: str, **values) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{kind} {name} must be >= 1, got {value}")


class BottleneckFusion(nn.Module):
  """Attention bottlenecks (MBT; Nagrani et al. 2021, "Attention Bottlenecks for
  Multimodal Fusion").

  Every modality gets a learned class token in front of its tokens and its own stack
  of `num_layers` transformer blocks. Blocks below `fusion_layer` see only their
  modality. From `fusion_layer` on, `num_bottlenecks` shared tokens join every
  modality's sequence: block l of modality m runs over [tokens_m; bottleneck], and
  the next bottleneck is the mean over the present modalities of their updated
  copies (MBT's eq. 8), so modalities exchange information only through those few
  tokens. Each modality's final class token goes through its own task head and the
  logits are averaged over the present modalities (MBT averages the per-modality
  logits), so `joint` is the task output (`produces_task_output`).

  A bottleneck updated by the last block reaches no one (only the class tokens are
  read), so exchange needs fusion_layer <= num_layers - 2; with `fusion_layer` equal
  to num_layers (or num_layers - 1) the module is late fusion of num_layers-block
  per-modality transformers.

  Attributes:
    num_classes, head_kind, head_hidden_dim, head_dropout_rate: the per-modality
      task heads (filled in from `model.task`, as for `late`).
    num_layers: blocks per modality, >= 1.
    fusion_layer: first block with bottleneck exchange, in [0, num_layers].
    num_bottlenecks: shared bottleneck tokens, >= 1.
    num_heads, mlp_dim (default 2 * D), dropout_rate: block fields.
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = True
  needs_tokens: ClassVar[bool] = True
  num_classes: int
  head_kind: str = "classification"
  head_hidden_dim: int | None = None
  head_dropout_rate: float = 0.0
  num_layers: int = 2
  fusion_layer: int = 0
  num_bottlenecks: int = 4
  num_heads: int = 2
  mlp_dim: int | None = None
  dropout_rate: float = 0.0
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("bottleneck", self.num_layers, self.num_heads,
                              self.dropout_rate)
    if self.num_bottlenecks < 1:
      raise ValueError(f"bottleneck num_bottlenecks must be >= 1, got "
                       f"{self.num_bottlenecks}: without bottleneck tokens no modality "
                       f"can reach another (for late fusion set fusion_layer="
                       f"num_layers)")
    if not 0 <= self.fusion_layer <= self.num_layers:
      raise ValueError(f"bottleneck fusion_layer={self.fusion_layer} is beyond the "
                       f"fusion's depth: it must be in [0, num_layers={self.num_layers}]"
                       f" (num_layers means no exchange, late fusion)")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], token_mask: Mapping[str, Array],
               mask: Mapping[str, Array], train: bool = False
               ) -> tuple[Array, dict[str, Array]]:
    """Returns the averaged logits [B, num_classes] and aux."""
    names, tokens, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                       self.modalities)
    batch, width = present.shape[0], tokens[names[0]].shape[-1]
    mlp_dim = self.mlp_dim or 2 * width
    x, keys = {}, {}
    for i, m in enumerate(names):
      cls = self.param(f"cls_{m}", nn.initializers.zeros, (1, 1, width))
      x[m] = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(
          tokens[m].dtype), tokens[m]], axis=1)
      keys[m] = jnp.concatenate([present[:, i, None], valid[m]], axis=1)
    bottleneck = None
    if self.fusion_layer < self.num_layers:
      init = self.param("bottleneck", nn.initializers.normal(0.02),
                        (1, self.num_bottlenecks, width))
      bottleneck = jnp.broadcast_to(init, (batch, self.num_bottlenecks, width))
    every = jnp.ones((batch, self.num_bottlenecks), bool)
    for layer in range(self.num_layers):
      updates = []
      for m in names:
        block = Block(self.num_heads, mlp_dim, self.dropout_rate, name=f"{m}_block_{layer}")
        if layer < self.fusion_layer:
          x[m] = block(x[m], keys[m], train)
          continue
        y = block(jnp.concatenate([x[m], bottleneck.astype(x[m].dtype)], axis=1),
                  jnp.concatenate([keys[m], every], axis=1), train)
        x[m], shared = y[:, :-self.num_bottlenecks], y[:, -self.num_bottlenecks:]
        updates.append(shared)
      if updates:   # MBT: the next bottleneck is the mean of the modalities' updates
        stacked = jnp.stack(updates, axis=1)   # [B, M, n, D]
        bottleneck = common.masked_mean(stacked.reshape(batch, len(names), -1),
                                        present).reshape(bottleneck.shape)
    classes = jnp.stack([nn.LayerNorm(name=f"{m}_norm")(x[m][:, 0]) for m in names],
                        axis=1)   # [B, M, D]
    classes = jnp.where(present[..., None], classes, 0)
    logits = TaskHead(self.num_classes, kind=self.head_kind,
                      hidden_dim=self.head_hidden_dim, dropout_rate=self.head_dropout_rate,
                      num_modalities=len(names), name="heads")(classes, train)
    return common.masked_mean(logits, present), _num_present(present)


class CrossAttentionFusion(nn.Module):
  """Co-attention streams (ViLBERT; Lu et al. 2019): every modality is a stream that
  attends to the other streams' tokens.

  Per layer and modality m, with all streams updated from the previous layer's tokens:
  co-attention (queries: m's tokens; keys and values: the valid tokens of every other
  present modality), self-attention within m, an MLP, each pre-LayerNorm and residual.
  A stream with no present partner skips the co-attention (zero update). Each
  stream is then mean-pooled over its valid tokens and layer-normalised; the pooled
  streams (zero where absent) and the presence bits are concatenated and projected.

  ViLBERT has two streams and its co-attention takes keys from the single other
  stream; with more than two, the other streams' tokens are concatenated into one key
  set. ViLBERT pools each stream's first token and multiplies the two; here the pooled
  streams are concatenated (a product is not defined for an absent stream).

  Attributes:
    num_layers: co-attention layers, >= 1.
    num_heads, mlp_dim (default 2 * D), dropout_rate: block fields.
    out_dim: output width (default D).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  needs_tokens: ClassVar[bool] = True
  num_layers: int = 1
  num_heads: int = 2
  mlp_dim: int | None = None
  dropout_rate: float = 0.0
  out_dim: int | None = None
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("cross_attention", self.num_layers, self.num_heads,
                              self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, token_mask, mask, train: bool = False):
    """Returns joint [B, out_dim or D] and aux."""
    names, x, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                  self.modalities)
    if len(names) < 2:
      raise ValueError(f"cross_attention needs two modalities or more, got {list(names)}")
    batch, width = present.shape[0], x[names[0]].shape[-1]
    for layer in range(self.num_layers):
      previous = dict(x)
      for m in names:
        others = [o for o in names if o != m]
        h = MaskedCrossAttention(self.num_heads, self.dropout_rate,
                                 name=f"{m}_co_attention_{layer}")(
            previous[m], jnp.concatenate([previous[o] for o in others], axis=1),
            jnp.concatenate([valid[o] for o in others], axis=1), train)
        h = MaskedSelfAttention(self.num_heads, self.dropout_rate,
                                name=f"{m}_self_attention_{layer}")(h, valid[m], train)
        x[m] = FeedForward(self.mlp_dim or 2 * width, self.dropout_rate,
                           name=f"{m}_mlp_{layer}")(h, train)
    pooled = jnp.stack([nn.LayerNorm(name=f"{m}_norm")(masked_token_mean(x[m], valid[m]))
                        for m in names], axis=1)
    pooled = jnp.where(present[..., None], pooled, 0)
    joint = nn.Dense(self.out_dim or width, name="out")(jnp.concatenate(
        [pooled.reshape(batch, -1), present.astype(pooled.dtype)], axis=-1))
    return joint, _num_present(present)


class JointFusion(nn.Module):
  """One transformer over the tokens of all present modalities (single stream,
  VL-BERT; Su et al. 2020).

  The sequence is [CLS; tokens_1 + type_1; ...; tokens_M + type_M], with a learned
  modality-type embedding per modality (VL-BERT's segment/visual-feature embeddings
  reduced to the type; positions come from the encoders). Invalid tokens and absent
  modalities are never keys. The final CLS token, layer-normalised (and projected to
  `out_dim`), is the joint representation, as VL-BERT classifies from [CLS].

  Attributes:
    num_layers: blocks, >= 1.
    num_heads, mlp_dim (default 2 * D), dropout_rate: block fields.
    out_dim: output width (default: D, no projection).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  needs_tokens: ClassVar[bool] = True
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int | None = None
  dropout_rate: float = 0.0
  out_dim: int | None = None
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("joint", self.num_layers, self.num_heads,
                              self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, token_mask, mask, train: bool = False):
    """Returns joint [B, out_dim or D] and aux."""
    names, x, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                  self.modalities)
    batch, width = present.shape[0], x[names[0]].shape[-1]
    types = self.param("type_embedding", nn.initializers.normal(0.02),
                       (len(names), width))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    seq = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, width)).astype(x[names[0]].dtype)]
        + [x[m] + types[i].astype(x[m].dtype) for i, m in enumerate(names)], axis=1)
    keys = jnp.concatenate([jnp.ones((batch, 1), bool)] + [valid[m] for m in names],
                           axis=1)
    for layer in range(self.num_layers):
      seq = Block(self.num_heads, self.mlp_dim or 2 * width, self.dropout_rate,
                  name=f"block_{layer}")(seq, keys, train)
    joint = nn.LayerNorm(name="final_norm")(seq[:, 0])
    if self.out_dim is not None:
      joint = nn.Dense(self.out_dim, name="out")(joint)
    return joint, _num_present(present)


class OvOTokenFusion(nn.Module):
  """One-Versus-Others attention over token sequences (Golovanevsky et al. 2024), the
  paper's form; `ovo` is the pooled one-token-per-modality variant.

  For each present modality i (the "main" one), per head:
    query_i   = W_q · mean over the other present modalities j of their mean token
    score_t   = query_iᵀ W key_t / √d_head    over i's valid tokens t, W shared by
                                              every modality (the paper's one W)
    context_i = Σ_t softmax(score)_t value_t
  so each modality is summarised by attention over its own tokens, steered by the
  others, at a cost linear in the number of modalities. The contexts (zero where
  absent) and the presence bits are concatenated and projected, as the paper
  concatenates the n attention outputs. A modality with no present other has a zero
  query, hence uniform weights: the mean of its values.

  The paper averages the other modalities' encoder outputs elementwise; token
  sequences of different lengths cannot be averaged so, and each is first
  mean-pooled over its valid tokens. The paper's code scores without the 1/√d_head;
  it is kept here, as in `ovo`.

  Attributes:
    num_heads: attention heads (must divide D).
    dropout_rate: dropout on the attention weights (training only).
    out_dim: output width (default D).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  needs_tokens: ClassVar[bool] = True
  num_heads: int = 2
  dropout_rate: float = 0.0
  out_dim: int | None = None
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    _check_transformer_config("ovo_tokens", 1, self.num_heads, self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, token_mask, mask, train: bool = False):
    """Returns joint [B, out_dim or D] and aux."""
    names, x, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                  self.modalities)
    batch, width = present.shape[0], x[names[0]].shape[-1]
    if width % self.num_heads:
      raise ValueError(f"token width D={width} is not divisible by "
                       f"num_heads={self.num_heads}")
    heads, head_dim = self.num_heads, width // self.num_heads
    shared_w = self.param("shared_w", nn.initializers.normal(head_dim ** -0.5),
                          (heads, head_dim, head_dim))
    norm = nn.LayerNorm(name="norm")
    query_proj = nn.Dense(width, name="query")
    key_proj, value_proj = nn.Dense(width, name="key"), nn.Dense(width, name="value")
    normed = {m: norm(x[m]) for m in names}
    summaries = jnp.stack([masked_token_mean(normed[m], valid[m]) for m in names], 1)
    contexts = []
    for i, m in enumerate(names):
      others = present.at[:, i].set(False)
      mean_others = common.masked_mean(summaries, others)     # [B, D]; 0 with none
      query = query_proj(mean_others).reshape(batch, heads, head_dim)
      query = jnp.where(others.any(axis=1)[:, None, None], query, 0)
      keys = key_proj(normed[m]).reshape(batch, -1, heads, head_dim)
      values = value_proj(normed[m]).reshape(batch, -1, heads, head_dim)
      scores = jnp.einsum("bhd,hde,bthe->bht", query, shared_w.astype(query.dtype),
                          keys) / jnp.sqrt(head_dim).astype(query.dtype)
      scores = jnp.where(valid[m][:, None, :], scores, jnp.finfo(scores.dtype).min)
      weights = jax.nn.softmax(scores, axis=-1)
      weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
      context = jnp.einsum("bht,bthd->bhd", weights, values).reshape(batch, width)
      contexts.append(jnp.where(present[:, i, None], context, 0))
    joint = nn.Dense(self.out_dim or width, name="out")(jnp.concatenate(
        contexts + [present.astype(x[names[0]].dtype)], axis=-1))
    return joint, _num_present(present)
