"""Fusion modules by name: `build_fusion(kind, **config)`, and
`build_fusion_from_config` (fusion + projections + task head) for models."""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import registry as registry_lib
from mmjax.fusion import common

from mmjax.fusion.attention import AttentionFusion, OvOFusion
from mmjax.fusion.flexmoe import FlexMoEFusion
from mmjax.fusion.gated import GatedFusion
from mmjax.fusion.heads import TaskHead
from mmjax.fusion.moe import MoEFusion
from mmjax.fusion.simple import ConcatFusion, LateFusion, MeanFusion
from mmjax.fusion.mmp import MMPFusion
from mmjax.fusion.proxy import ProxyTokenFusion
from mmjax.fusion.tokens import (BottleneckFusion, CrossAttentionFusion, JointFusion,
                                 OvOTokenFusion)

FUSION_MODULES = registry_lib.Registry("fusion kind")
for _kind, _module in {
    "concat": ConcatFusion,
    "mean": MeanFusion,
    "late": LateFusion,
    "attention": AttentionFusion,
    "ovo": OvOFusion,
    "moe": MoEFusion,
    "flexmoe": FlexMoEFusion,
    "gated": GatedFusion,
    "bottleneck": BottleneckFusion,
    "cross_attention": CrossAttentionFusion,
    "joint": JointFusion,
    "ovo_tokens": OvOTokenFusion,
    "mmp": MMPFusion,
    "proxy": ProxyTokenFusion,
}.items():
  FUSION_MODULES.register(_kind, _module)
FUSION_KINDS = tuple(FUSION_MODULES)
Array = jax.Array


def needs_tokens(kind: str) -> bool:
  """Whether a fusion kind fuses token sequences (`needs_tokens` on its class): a model
  with such a fusion asks its encoders for their tokens (`ModelOutput.tokens`)."""
  return bool(getattr(FUSION_MODULES.lookup(kind).obj, "needs_tokens", False))


def fusion_config_fields(kind: str) -> tuple[str, ...]:
  """The config fields a fusion kind accepts."""
  return tuple(FUSION_MODULES.lookup(kind).fields)


def build_fusion(kind: str, **config: Any) -> nn.Module:
  """Builds a fusion module.

  Args:
    kind: one of FUSION_KINDS.
    **config: the module's fields (see each class); lists become tuples. A
      config dict that holds 'kind' too works as `build_fusion(**config)`.

  Returns:
    An unbound linen module; `joint, aux = module.apply(variables, features,
    mask, train=..., rngs={'dropout': key})`.

  Raises:
    ValueError: unknown kind, a config field the kind does not have (named),
      or an invalid value (e.g. top_k larger than num_experts).
  """
  FUSION_MODULES.check_fields(kind, config)
  config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return FUSION_MODULES[kind].obj(**config)


def _plain(value: Any) -> Any:
  """ConfigDict / dict / list values -> hashable plain values (tuples)."""
  if hasattr(value, "items"):
    return tuple(sorted((k, _plain(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


class FusionWithTaskHead(nn.Module):
  """A fusion module, optional projections to a common width, optional task head.

  This is what a model holds: `joint, logits, aux = module(features, mask,
  train=...)` with features dict modality -> [B, D_m] (widths may differ when
  `width` is set), mask dict modality -> bool [B]. `logits` is None without a
  task config. For `late` fusion (and every kind with `produces_task_output`),
  joint and logits are the same array: the average of the per-modality heads'
  outputs (its head config comes from the task config).

  Token-level kinds (`needs_tokens`) also take `tokens` (modality -> [B, T_m, D_m])
  and `token_mask` (modality -> bool [B, T_m]); the token masks are ANDed with the
  modality mask (after modality dropout), invalid tokens are zeroed, and `width`
  projects every token of modality m with m's dense layer. The module then gets
  `(tokens, token_mask, mask)`; the pooled features only feed the unimodal heads.

  Attributes:
    kind: fusion kind.
    fusion_config: the fusion module's fields, as sorted (name, value) pairs.
    task_config: TaskHead fields (num_classes, kind, hidden_dim, dropout_rate)
      as sorted pairs, or None.
    width: if set, every modality is projected by its own dense layer to this
      width before fusion (absent entries are zeroed first, so garbage in them
      reaches no parameter); if None, the features must already share a width.
    modality_dropout: in training, each present modality is dropped from the
      mask with this probability (at least one is kept; `common.modality_dropout`,
      rng stream 'dropout'), so the fusion learns to work without it.
    unimodal_weight: if > 0, one more task head per modality on that modality's
      encoder features (before projection and modality dropout), returned as
      `aux['unimodal_logits']` (modality -> [B, C]); the task objective adds
      unimodal_weight x the mean over modalities of each head's loss on the
      examples where its modality is present (`objectives.task_objective`).
  """
  kind: str
  fusion_config: tuple = ()
  task_config: tuple | None = None
  width: int | None = None
  modality_dropout: float = 0.0
  unimodal_weight: float = 0.0

  def setup(self):
    # Checked by `build_fusion_from_config`; here the fields only become a module.
    self.fusion = FUSION_MODULES[self.kind].obj(**dict(self.fusion_config))
    task = dict(self.task_config or ())
    self.head = None
    if task and not self.fusion.produces_task_output:
      self.head = TaskHead(**task)
    self.projections = (None if self.width is None else
                        {m: nn.Dense(self.width) for m in self._modalities()})
    self.unimodal_heads = ({m: TaskHead(**task) for m in self._modalities()}
                           if self.unimodal_weight > 0 else None)

  @property
  def needs_tokens(self) -> bool:
    return needs_tokens(self.kind)

  def _modalities(self):
    modalities = dict(self.fusion_config).get("modalities")
    if modalities is None:
      raise ValueError("FusionWithTaskHead with a width needs fusion_config to "
                       "name its modalities")
    return modalities

  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False, step: Array | None = None,
               tokens: Mapping[str, Array] | None = None,
               token_mask: Mapping[str, Array] | None = None):
    """Returns (joint [B, D_out], logits [B, C] or None, aux).

    `step` (int scalar or None) is passed on to fusion modules whose `__call__` takes
    a `step` (those with step-dependent hyperparameters); the others never see it.
    `tokens` and `token_mask` are required by token-level kinds and ignored by the
    others.
    """
    names = common.modality_names(features, mask, dict(self.fusion_config).get(
        "modalities"))
    unimodal_logits = None
    if self.unimodal_heads is not None:   # on the data's mask, before modality dropout
      unimodal_logits = {m: self.unimodal_heads[m](jnp.where(
          jnp.asarray(mask[m])[:, None], features[m], 0), train=train) for m in names}
    if train and self.modality_dropout > 0:
      mask = common.modality_dropout({m: mask[m] for m in names}, self.modality_dropout,
                                     self.make_rng("dropout"))
    if self.needs_tokens:
      joint, aux = self._fuse_tokens(names, mask, tokens, token_mask, train, step)
    else:
      joint, aux = self._fuse_pooled(names, features, mask, train, step)
    if unimodal_logits is not None:
      aux = {**aux, "unimodal_logits": unimodal_logits}
    if self.fusion.produces_task_output:
      return joint, joint, aux
    logits = None if self.head is None else self.head(joint, train=train)
    return joint, logits, aux

  def _call_fusion(self, inputs, mask, train, step):
    """The fusion module on `inputs` (features, or (tokens, token_mask)); `step` only
    for modules whose `__call__` takes one."""
    takes_step = "step" in inspect.signature(type(self.fusion).__call__).parameters
    return self.fusion(*inputs, mask, train=train, **({"step": step} if takes_step
                                                      else {}))

  def _fuse_tokens(self, names, mask, tokens, token_mask, train, step):
    if tokens is None or token_mask is None:
      raise ValueError(f"fusion kind {self.kind!r} fuses token sequences: call it with "
                       f"tokens= and token_mask= (MultimodalModel passes the encoders')")
    for what, given in (("tokens", tokens), ("token_mask", token_mask)):
      if set(given) != set(names):
        raise ValueError(f"fusion kind {self.kind!r}: {what} has modalities "
                         f"{sorted(given)}, the mask {list(names)}")
    for m in names:
      if jnp.ndim(tokens[m]) != 3 or jnp.shape(token_mask[m]) != jnp.shape(tokens[m])[:2]:
        raise ValueError(f"tokens[{m!r}] must be [B, T, D] with token_mask[{m!r}] "
                         f"[B, T]; got {jnp.shape(tokens[m])} and "
                         f"{jnp.shape(token_mask[m])}")
    token_mask = {m: jnp.asarray(token_mask[m]) & jnp.asarray(mask[m])[:, None]
                  for m in names}
    tokens = {m: jnp.where(token_mask[m][..., None], tokens[m], 0) for m in names}
    if self.projections is not None:
      tokens = {m: self.projections[m](tokens[m]) for m in names}
    else:
      widths = {m: jnp.shape(tokens[m])[-1] for m in names}
      if len(set(widths.values())) > 1:
        raise ValueError(f"token-level fusion {self.kind!r} needs tokens of one width, "
                         f"got widths {widths}; set the fusion config's 'width' "
                         f"(model.fusion.width) to project each modality's tokens")
    return self._call_fusion((tokens, token_mask), {m: mask[m] for m in names}, train,
                             step)

  def _fuse_pooled(self, names, features, mask, train, step):
    if self.projections is not None:
      features = {m: self.projections[m](jnp.where(
          jnp.asarray(mask[m])[:, None], features[m], 0)) for m in names}
    else:
      widths = {m: jnp.shape(features[m])[-1] for m in names}
      if len(set(widths.values())) > 1:
        raise ValueError(f"fusion needs features of one width, got {widths}; set "
                         f"the fusion config's 'width' to project them")
    return self._call_fusion((features,), mask, train, step)


def build_fusion_from_config(fusion_config: Mapping[str, Any],
                             task_config: Mapping[str, Any] | None = None, *,
                             modalities: Sequence[str] | None = None
                             ) -> FusionWithTaskHead:
  """Builds fusion (+ projections, + task head) from config mappings.

  Args:
    fusion_config: {'kind': ..., 'width': optional common width,
      'modality_dropout': optional training-time drop rate, **fields}.
    task_config: optional {'num_classes': C, 'kind': 'classification' |
      'multilabel' | 'regression', 'hidden_dim', 'dropout_rate',
      'unimodal_weight'}; for `late` fusion it supplies the per-modality heads'
      config. `unimodal_weight` (>= 0, default 0) adds the auxiliary unimodal
      heads of `FusionWithTaskHead`, with the same head fields.
    modalities: the model's modalities (set as the fusion's `modalities`
      unless the fusion config names them).

  Returns:
    An unbound FusionWithTaskHead; invalid configs raise ValueError here.
  """
  config = dict(_plain(fusion_config))
  if "kind" not in config:
    raise ValueError(f"fusion config needs a 'kind' (one of {list(FUSION_KINDS)}); "
                     f"got fields {sorted(config)}")
  kind = config.pop("kind")
  width = config.pop("width", None)
  modality_dropout = config.pop("modality_dropout", 0.0)
  if not 0.0 <= modality_dropout < 1.0:
    raise ValueError(f"fusion modality_dropout must be in [0, 1), got {modality_dropout}")
  if modalities is not None and config.get("modalities") is not None:
    unknown = sorted(set(config["modalities"]) - set(modalities))
    if set(config["modalities"]) != set(modalities):
      raise ValueError(f"fusion modalities {sorted(config['modalities'])} do not match "
                       f"the model's modalities {sorted(modalities)}"
                       + (f": the model has no encoder for {unknown}" if unknown else ""))
  if modalities is not None and config.get("modalities") is None:
    config["modalities"] = tuple(sorted(modalities))
  if width is not None and config.get("modalities") is None:
    raise ValueError("fusion config 'width' (per-modality projections) needs the "
                     "modalities: pass modalities= or set fusion 'modalities'")
  task = dict(_plain(task_config)) if task_config else {}
  fields = ["num_classes", "kind", "hidden_dim", "dropout_rate", "unimodal_weight"]
  unknown = sorted(set(task) - set(fields))
  if unknown:
    raise ValueError(f"task config has no field(s) {unknown}; its fields are {fields}")
  if task and "num_classes" not in task:
    raise ValueError("task config needs 'num_classes'")
  unimodal_weight = task.pop("unimodal_weight", 0.0)
  if not (isinstance(unimodal_weight, (int, float)) and 0 <= unimodal_weight < float("inf")):
    raise ValueError(f"task unimodal_weight must be a finite number >= 0, got "
                     f"{unimodal_weight!r}")
  if unimodal_weight > 0 and task.get("kind", "classification") != "classification":
    raise ValueError(f"task unimodal_weight: the unimodal heads are trained with "
                     f"cross-entropy, for kind 'classification'; got {task['kind']!r}")
  if unimodal_weight > 0 and kind == "late":
    raise ValueError("task unimodal_weight: late fusion's heads are already one per "
                     "modality, trained on the averaged logits; set it to 0")
  if unimodal_weight > 0 and config.get("modalities") is None:
    raise ValueError("task unimodal_weight (one head per modality) needs the "
                     "modalities: pass modalities= or set fusion 'modalities'")
  if getattr(FUSION_MODULES.lookup(kind).obj, "produces_task_output", False) and task:
    for field, late_field in (("num_classes", "num_classes"), ("kind", "head_kind"),
                              ("hidden_dim", "head_hidden_dim"),
                              ("dropout_rate", "head_dropout_rate")):
      if field in task:
        config.setdefault(late_field, task[field])
  build_fusion(kind, **config)  # fail now, naming the field, not inside init
  if task:
    TaskHead(**task)
  return FusionWithTaskHead(kind=kind, fusion_config=tuple(sorted(config.items())),
                            task_config=tuple(sorted(task.items())) or None,
                            width=width, modality_dropout=modality_dropout,
                            unimodal_weight=float(unimodal_weight))
