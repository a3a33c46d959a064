"""Baseline fusion: concatenation, masked mean, late fusion.

All modules: `joint, aux = module.apply(variables, features, mask, train=...)`
with features dict modality -> [B, D], mask dict modality -> bool [B]
(see `mmjax.fusion.common`). Training randomness draws from the 'dropout'
rng stream. Auxiliary losses in aux are under 'loss/<name>' and are already
multiplied by their weight (the trainer adds them to the task loss as they
are); statistics are under 'stats/<name>'.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.fusion import common
from mmjax.fusion.heads import TaskHead

Array = jax.Array


def _num_present_stats(present: Array) -> dict[str, Array]:
  return {"stats/num_present": jnp.mean(jnp.sum(present, axis=1).astype(jnp.float32))}


class ConcatFusion(nn.Module):
  """Concatenation of zero-filled modality slots, then an MLP.

  The presence bits are concatenated too, so the MLP can tell an absent
  modality from a present one whose features happen to be zero.

  Attributes:
    hidden_dim: width of the hidden layers (default: D).
    out_dim: output width D_out (default: D).
    num_layers: dense layers in the MLP (>= 1; GELU between them).
    dropout_rate: dropout after each hidden layer (training only).
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  hidden_dim: int | None = None
  out_dim: int | None = None
  num_layers: int = 2
  dropout_rate: float = 0.0
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f"concat num_layers must be >= 1, got {self.num_layers}")
    super().__post_init__()

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim] and aux {'stats/num_present'}."""
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    batch, num_modalities, width = x.shape
    h = jnp.concatenate([x.reshape(batch, num_modalities * width),
                         present.astype(x.dtype)], axis=-1)
    for i in range(self.num_layers - 1):
      h = nn.gelu(nn.Dense(self.hidden_dim or width, name=f"hidden_{i}")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    joint = nn.Dense(self.out_dim or width, name="out")(h)
    return joint, _num_present_stats(present)


class MeanFusion(nn.Module):
  """Mean of the present modalities' features (no parameters).

  Attributes:
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  modalities: Sequence[str] | None = None

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, D] = mean over present modalities, and aux."""
    del train
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    return common.masked_mean(x, present), _num_present_stats(present)


class LateFusion(nn.Module):
  """Late fusion: one task head per modality, averaged over present ones.

  Unlike the other kinds, `joint` here is already the task output
  [B, num_classes] (`produces_task_output` is True): the trainer uses it as
  the logits / predictions and applies no further task head. The outputs of
  the per-modality heads are averaged:
    classification  mean of logits; softmax(mean logits) is the normalised
                    geometric mean of the per-modality softmaxes (a product of
                    experts over the present modalities)
    multilabel      mean of the per-label logits
    regression      mean of the predictions

  Attributes:
    num_classes, head_kind, head_hidden_dim, head_dropout_rate: the TaskHead
      config used for each modality's head.
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = True
  num_classes: int
  head_kind: str = "classification"
  head_hidden_dim: int | None = None
  head_dropout_rate: float = 0.0
  modalities: Sequence[str] | None = None

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint = averaged outputs [B, num_classes], and aux."""
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    per_modality = TaskHead(self.num_classes, kind=self.head_kind,
                            hidden_dim=self.head_hidden_dim,
                            dropout_rate=self.head_dropout_rate,
                            num_modalities=x.shape[1], name="heads")(x, train)
    return common.masked_mean(per_modality, present), _num_present_stats(present)
