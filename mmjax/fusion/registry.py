"""Fusion modules by name: `build_fusion(kind, **config)`."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from mmjax.fusion.attention import AttentionFusion, OvOFusion
from mmjax.fusion.flexmoe import FlexMoEFusion
from mmjax.fusion.gated import GatedFusion
from mmjax.fusion.moe import MoEFusion
from mmjax.fusion.simple import ConcatFusion, LateFusion, MeanFusion

FUSION_MODULES: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "mean": MeanFusion,
    "late": LateFusion,
    "attention": AttentionFusion,
    "ovo": OvOFusion,
    "moe": MoEFusion,
    "flexmoe": FlexMoEFusion,
    "gated": GatedFusion,
}
FUSION_KINDS = tuple(FUSION_MODULES)


def fusion_config_fields(kind: str) -> tuple[str, ...]:
  """The config fields a fusion kind accepts."""
  if kind not in FUSION_MODULES:
    raise ValueError(f"unknown fusion kind {kind!r}; known kinds: {list(FUSION_KINDS)}")
  return tuple(f.name for f in dataclasses.fields(FUSION_MODULES[kind])
               if f.init and f.name not in ("parent", "name"))


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
  fields = fusion_config_fields(kind)
  unknown = sorted(set(config) - set(fields))
  if unknown:
    raise ValueError(f"fusion kind {kind!r} has no config field(s) {unknown}; "
                     f"its fields are {list(fields)}")
  required = [f.name for f in dataclasses.fields(FUSION_MODULES[kind])
              if f.name in fields and f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING]
  missing = sorted(set(required) - set(config))
  if missing:
    raise ValueError(f"fusion kind {kind!r} needs config field(s) {missing}")
  config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return FUSION_MODULES[kind](**config)
