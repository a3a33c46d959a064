"""`MultimodalModel`: encoders -> projection heads -> unit-norm embeddings
(-> fusion -> task head), built from `config.model`.

The model runs exactly the encoders named in its config; a batch that lacks one of
them is an error, never a silent skip. Embeddings of absent modalities are still
computed (their inputs are zero-filled); `batch['mask']` tells objectives and fusion
which to ignore.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import align
from mmjax import registry as registry_lib
from mmjax.models import heads as heads_lib
from mmjax.models import matching as matching_lib
from mmjax.models import registry


@flax.struct.dataclass
class ModelOutput:
  """What `MultimodalModel.apply` returns.

  embeddings: modality -> [B, embed_dim], unit norm.
  features:   modality -> [B, encoder width], before projection.
  logit_scale: scalar exp(t), t the learned log-scale (param 'logit_scale'; the
    optimizer, not the forward pass, keeps t in [0, log model.max_logit_scale]).
  logit_bias: scalar or None (SigLIP).
  logits: [B, num_classes] task logits, or None without a task head.
  joint: [B, D] fused representation, or None without fusion.
  aux: auxiliary losses ('loss/...') and statistics ('stats/...') from fusion.
  matcher: the matching head (`mmjax.models.matching.Matcher`) for objectives that
    score re-paired inputs, or None without `model.matching`.
  unimodal_logits: modality -> [B, num_classes] from the auxiliary unimodal heads
    (`model.task.unimodal_weight` > 0), or None.
  unimodal_weight: that weight (static), which the task objective applies.
  tokens: modality -> [B, T_m, encoder width], the encoder's token sequence, or None:
    computed only when the fusion kind works on tokens (`fusion.needs_tokens`), so a
    model with pooled fusion or none (CLIP) traces exactly what it did before.
  token_mask: modality -> bool [B, T_m], True for a valid token of a present
    modality (an absent modality's row is all False), or None with `tokens`.
  """
  embeddings: dict
  features: dict
  logit_scale: jax.Array
  logit_bias: Optional[jax.Array] = None
  logits: Optional[jax.Array] = None
  joint: Optional[jax.Array] = None
  aux: dict = flax.struct.field(default_factory=dict)
  matcher: Optional[matching_lib.Matcher] = None
  unimodal_logits: Optional[dict] = None
  unimodal_weight: float = flax.struct.field(pytree_node=False, default=0.0)
  tokens: Optional[dict] = None
  token_mask: Optional[dict] = None


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def encoder_fields(encoder_config, where: str = "") -> dict[str, Any]:
  """The module fields of one `model.encoders.<m>` entry (`kind`, `variant`,
  overrides): its variant's sizes, then the overrides. Unknown kinds, variants and
  fields are errors naming them (`where` prefixes the message)."""
  if "kind" not in encoder_config:
    raise ValueError(f"{where or 'encoder config'} has no 'kind'; valid kinds: "
                     f"{sorted(registry.ENCODERS)}")
  overrides = {k: v for k, v in encoder_config.items() if k not in ("kind", "variant")}
  return registry.encoder_fields(encoder_config["kind"], encoder_config.get("variant"),
                                 where=where, **overrides)


class MultimodalModel(nn.Module):
  """Any set of modality encoders with projection heads into one embedding space.

  Attributes:
    encoders: modality -> encoder config (`kind`, `variant`, module overrides).
    embed_dim: shared embedding width.
    head: projection head kind ('linear' or 'mlp').
    logit_scale_init: initial log of the similarity multiplier (CLIP: log(1/0.07)).
      Its cap, `config.model.max_logit_scale`, is a clamp applied by the optimizer
      (`mmjax.train.optimizer.clamp_logit_scale`), not here.
    logit_bias_init: initial logit bias (SigLIP: -10), None for no bias.
    fusion: optional `mmjax.fusion.FusionWithTaskHead` fields (fusion kind, its
      fields, the task head's), checked by `build` from `config.model.fusion` and
      `config.model.task`.
    matching: optional `MatchingHead` fields (a dict, may be empty), for
      GRAM's matching objective; needs two modalities or more.
  """
  encoders: Mapping[str, Any]
  embed_dim: int = 128
  head: str = "linear"
  logit_scale_init: float = align.CLIP_INIT_LOGIT_SCALE
  logit_bias_init: Optional[float] = None
  fusion: Optional[Mapping[str, Any]] = None
  matching: Optional[Mapping[str, Any]] = None

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.encoders))

  def setup(self):
    # `build` has checked every encoder config; here they only become modules.
    self.towers = {m: registry.ENCODERS[c["kind"]].obj.module(**encoder_fields(c))
                   for m, c in self.encoders.items()}
    self.heads = {m: heads_lib.ProjectionHead(self.embed_dim, kind=self.head)
                  for m in self.encoders}
    self.log_logit_scale = self.param(
        "logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)
    if self.fusion is not None:
      from mmjax import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
      self.fuse = fusion_lib.FusionWithTaskHead(**self.fusion)   # checked by `build`
    if self.matching is not None:
      self.matching_head = matching_lib.MatchingHead(**self.matching)

  def __call__(self, batch: Mapping[str, Any], *, train: bool = False,
               step: Optional[jax.Array] = None) -> ModelOutput:
    """Encodes every configured modality of `batch`.

    Args:
      batch: modality -> input array (docs/architecture.md), plus `mask` (modality -> bool [B]).
      train: enables dropout and other training-only behaviour (rng 'dropout').
      step: int scalar, the training step (the train step passes `state.step`); handed
        to the fusion module for its step-dependent hyperparameters
        (`mmjax.schedules`). None (eval): schedules take their final value.
    """
    mask = batch.get("mask", {})
    for m in self.modalities:
      if m not in batch:
        raise ValueError(
            f"the model expects modality {m!r} (model.encoders) but the batch has only "
            f"{sorted(k for k in batch if k not in ('mask', 'label', 'index', 'factors'))}")
    if self.fusion is not None:
      for m in self.modalities:
        if m not in mask:
          raise ValueError(f"fusion needs batch['mask'][{m!r}]; the mask has {sorted(mask)}")
    want_tokens = self.fusion is not None and self.fuse.needs_tokens
    features, embeddings = {}, {}
    tokens, token_mask = ({}, {}) if want_tokens else (None, None)
    for m in self.modalities:
      if want_tokens:   # absent modalities: every token invalid
        features[m], tokens[m], valid = self.towers[m](batch[m], train=train,
                                                       return_tokens=True)
        token_mask[m] = valid & jnp.asarray(mask[m])[:, None]
      else:
        features[m] = self.towers[m](batch[m], train=train)
      embeddings[m] = l2_normalize(self.heads[m](features[m]).astype(jnp.float32))
    logit_scale = jnp.exp(self.log_logit_scale)
    logit_bias = self.logit_bias if self.logit_bias_init is not None else None
    logits = joint = unimodal_logits = None
    aux = {}
    if self.fusion is not None:
      joint, logits, aux = self.fuse(features, {m: mask[m] for m in self.modalities},
                                     train=train, step=step, tokens=tokens,
                                     token_mask=token_mask)
      aux = dict(aux)
      unimodal_logits = aux.pop("unimodal_logits", None)
    matcher = None
    if self.matching is not None:
      if self.is_initializing():   # the head's params exist once it has run
        first, *rest = self.modalities
        self.matching_head(first, features[first], {m: features[m] for m in rest})
      matcher = matching_lib.Matcher(
          params=self.matching_head.variables["params"],
          rng=self.make_rng("dropout") if train and self.has_rng("dropout") else None,
          head=matching_lib.MatchingHead(**self.matching, parent=None))  # unbound
    return ModelOutput(embeddings=embeddings, features=features, logit_scale=logit_scale,
                       logit_bias=logit_bias, logits=logits, joint=joint, aux=aux,
                       matcher=matcher, unimodal_logits=unimodal_logits,
                       unimodal_weight=(self.fusion or {}).get("unimodal_weight", 0.0),
                       tokens=tokens, token_mask=token_mask)


def build(model_config) -> MultimodalModel:
  """`config.model` -> an unbound `MultimodalModel`."""
  c = model_config
  encoders = {m: dict(e) for m, e in c.encoders.items()}
  for m, e in encoders.items():
    encoder_fields(e, where=f"model.encoders.{m}")   # fail here, naming the field
  fusion = c.get("fusion")
  task = c.get("task")
  if fusion is not None:
    from mmjax import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
    try:   # an unknown kind or field, or a modality without an encoder, fails here
      fused = fusion_lib.build_fusion_from_config(
          dict(fusion), dict(task) if task else None, modalities=tuple(sorted(encoders)))
    except ValueError as e:
      raise ValueError(f"model.fusion: {e}") from None
    fusion = {f: getattr(fused, f) for f in registry_lib.dataclass_fields(
        fusion_lib.FusionWithTaskHead)}
    if fusion_lib.needs_tokens(fusion["kind"]):
      for m, e in sorted(encoders.items()):
        module = registry.ENCODERS[e["kind"]].obj.module
        if "return_tokens" not in inspect.signature(module.__call__).parameters:
          raise ValueError(
              f"model.fusion: kind {fusion['kind']!r} fuses token sequences, but the "
              f"encoder of {m!r} (model.encoders.{m}.kind={e['kind']!r}, "
              f"{module.__name__}) returns only a pooled vector (its __call__ has no "
              f"return_tokens)")
  matching = c.get("matching")
  if matching is not None:
    if len(encoders) < 2:
      raise ValueError(f"model.matching scores an anchor against the other modalities; "
                       f"the model has only {sorted(encoders)}")
    matching = dict(matching)
    valid = set(registry_lib.dataclass_fields(matching_lib.MatchingHead))
    if set(matching) - valid:
      raise ValueError(f"model.matching: unknown field(s) {sorted(set(matching) - valid)}; "
                       f"valid: {sorted(valid)}")
  return MultimodalModel(
      encoders=encoders, embed_dim=c.embed_dim, head=c.head,
      logit_scale_init=c.logit_scale_init,
      logit_bias_init=c.get("logit_bias_init"),
      fusion=fusion,
      matching=matching)
