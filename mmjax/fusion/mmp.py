"""Masked modality projection (MMP; Nezakati et al. 2024, "MMP: Towards Robust
Multi-Modal Learning with Masked Modality Projection").

One model for every combination of present modalities: in training, present
modalities are masked at random, and a projection learns to predict each masked
modality's tokens from the tokens of the modalities that remain; wherever a
modality is absent (masked on purpose in training, or missing in the data, in
training and at test time), its predicted tokens stand in for it, and a token-level
fusion backbone sees every modality. The projection is trained by the task loss
through the backbone and by an alignment loss, the mean squared error between the
predicted and the true tokens of the modalities masked on purpose (the only ones
whose true tokens are known).

  prediction of m = mean over the present sources s != m of P_{s->m}(tokens_s)
  P_{s->m}(x)     = Dense_D( A_{s->m}ᵀ x )      A_{s->m}: [T_s, T_m], a linear map
                                               over the token axis, then one over
                                               the features
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import schedules
from mmjax.fusion import common
from mmjax.fusion.tokens import (CrossAttentionFusion, JointFusion, OvOTokenFusion,
                                 stack_token_inputs)

Array = jax.Array

# Token-level kinds that return a joint vector, usable as MMP's backbone.
BACKBONES = {"joint": JointFusion, "cross_attention": CrossAttentionFusion,
             "ovo_tokens": OvOTokenFusion}


class ModalityProjection(nn.Module):
  """Source tokens [B, T_s, D] (invalid ones zeroed) -> predicted target tokens
  [B, num_tokens, D]: a learned [T_s, num_tokens] map over the token axis, then a
  dense layer over the features."""

  @nn.compact
  def __call__(self, source: Array, valid: Array, num_tokens: int) -> Array:
    source = jnp.where(valid[..., None], source, 0)
    token_map = self.param("token_map", nn.initializers.lecun_normal(),
                           (source.shape[1], num_tokens))
    mixed = jnp.einsum("bsd,st->btd", source, token_map.astype(source.dtype))
    return nn.Dense(source.shape[-1], name="feature_map")(mixed)


class MMPFusion(nn.Module):
  """A token-level fusion backbone whose absent modalities are replaced by tokens
  predicted from the present ones (see the module doc).

  Attributes:
    modalities: the model's modalities (required: one projection per ordered pair).
    backbone: the token-level fusion over the filled-in modalities, one of
      `BACKBONES`.
    backbone_config: that backbone's fields (a mapping or (name, value) pairs).
    predict: the modalities whose tokens are predicted when absent (default: all);
      an absent modality not listed stays absent for the backbone.
    mask_rate: in training, each present modality is masked with this probability
      (at least one kept; rng stream 'dropout'); a number or a schedule config
      (`mmjax.schedules`, evaluated at the training step; its final value without
      one), e.g. no masking for the first steps and a ramp to the rate after them.
    loss_weight: weight of the alignment loss `loss/mmp_alignment`.
  """
  produces_task_output: ClassVar[bool] = False
  needs_tokens: ClassVar[bool] = True
  modalities: Sequence[str] | None = None
  backbone: str = "joint"
  backbone_config: Any = ()
  predict: Sequence[str] | None = None
  mask_rate: float | tuple | Any = 0.3
  loss_weight: float = 1.0

  def __post_init__(self):
    if self.modalities is None:
      raise ValueError("mmp needs its modalities (one projection per pair of "
                       "modalities); a model fills them in from model.encoders")
    if self.backbone not in BACKBONES:
      raise ValueError(f"mmp backbone must be one of {sorted(BACKBONES)}, got "
                       f"{self.backbone!r}")
    if self.predict is not None:
      unknown = sorted(set(self.predict) - set(self.modalities))
      if unknown:
        raise ValueError(f"mmp predict: the model has no encoder for {unknown}, so "
                         f"there are no tokens to learn them from; its modalities are "
                         f"{sorted(self.modalities)}")
    if len(self.modalities) < 2:
      raise ValueError(f"mmp predicts a modality from the others: it needs two "
                       f"modalities or more, got {list(self.modalities)}")
    schedules.check(self.mask_rate, "mmp mask_rate", upper=1.0)
    if not self.loss_weight >= 0:
      raise ValueError(f"mmp loss_weight must be >= 0, got {self.loss_weight}")
    config = dict(self.backbone_config)
    if "modalities" in config:
      raise ValueError("mmp backbone_config: 'modalities' is set by mmp itself")
    BACKBONES[self.backbone](**config, parent=None)   # a bad field fails here
    super().__post_init__()

  def setup(self):
    names = tuple(sorted(self.modalities))
    self.projections = {f"{s}_to_{t}": ModalityProjection()
                        for t in names for s in names if s != t}
    self.fuse = BACKBONES[self.backbone](modalities=names, **dict(self.backbone_config))

  def fill(self, tokens, token_mask, mask, kept=None):
    """The backbone's inputs: real tokens where a modality is present (`kept`),
    predicted ones where it is absent and listed in `predict`.

    Args:
      tokens, token_mask, mask: as for every token-level fusion.
      kept: bool [B, M] (sorted-name order), the modalities to treat as present; a
        subset of `mask` (default: `mask`).

    Returns:
      (filled tokens, filled token mask, filled presence bool [B, M], predicted
      tokens dict).
    """
    names, x, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                  self.modalities)
    kept = present if kept is None else kept & present
    predict = set(self.predict or names)
    filled, filled_valid, predicted = {}, {}, {}
    filled_present = []
    for i, target in enumerate(names):
      sources = [s for s in names if s != target]
      preds = jnp.stack([self.projections[f"{s}_to_{target}"](
          x[s], valid[s] & kept[:, names.index(s), None], x[target].shape[1])
          for s in sources], axis=1)                                  # [B, S, T, D]
      source_kept = jnp.stack([kept[:, names.index(s)] for s in sources], axis=1)
      batch = preds.shape[0]   # mean over the kept sources
      predicted[target] = common.masked_mean(preds.reshape(batch, len(sources), -1),
                                             source_kept).reshape(batch, *preds.shape[2:])
      here = kept[:, i]
      if target in predict:
        filled[target] = jnp.where(here[:, None, None], x[target], predicted[target])
        filled_valid[target] = jnp.where(here[:, None], valid[target], True)
        filled_present.append(jnp.ones_like(here))
      else:
        filled[target] = jnp.where(here[:, None, None], x[target], 0)
        filled_valid[target] = valid[target] & here[:, None]
        filled_present.append(here)
    return filled, filled_valid, jnp.stack(filled_present, axis=1), predicted

  def __call__(self, tokens, token_mask, mask, train: bool = False,
               step: Array | None = None):
    """Returns the backbone's joint [B, D_out] and aux with `loss/mmp_alignment`;
    `step` (int scalar) for a `mask_rate` schedule."""
    names = common.modality_names(tokens, mask, self.modalities)
    present = common.stack_mask(mask, names)
    kept = present
    rate = None
    if train and self.mask_rate != 0.0:
      rate = schedules.value_at(self.mask_rate, step, "mmp mask_rate")
      kept = common.modality_dropout(present, rate, self.make_rng("dropout"))
    filled, filled_valid, filled_present, predicted = self.fill(
        tokens, token_mask, mask, kept)
    joint, aux = self.fuse(filled, filled_valid,
                           {m: filled_present[:, i] for i, m in enumerate(names)},
                           train=train)
    # Alignment: predicted against true tokens where a present modality was masked.
    total, count = 0.0, 0.0
    for i, m in enumerate(names):
      if m not in set(self.predict or names):
        continue
      target_valid = (jnp.asarray(token_mask[m]) & (present[:, i] & ~kept[:, i])[:, None])
      target = jax.lax.stop_gradient(jnp.where(target_valid[..., None], tokens[m], 0))
      error = jnp.mean(jnp.square(predicted[m] - target), axis=-1)   # [B, T]
      total = total + jnp.sum(jnp.where(target_valid, error, 0))
      count = count + jnp.sum(target_valid)
    alignment = total / jnp.maximum(count, 1)
    aux = dict(aux)
    aux["loss/mmp_alignment"] = self.loss_weight * alignment
    aux["stats/mmp_alignment"] = alignment
    aux["stats/mmp_masked_fraction"] = jnp.mean((present & ~kept).astype(jnp.float32))
    if rate is not None:
      aux["stats/mmp_mask_rate"] = rate
    aux["stats/num_present"] = jnp.mean(jnp.sum(present, 1).astype(jnp.float32))
    return joint, aux
