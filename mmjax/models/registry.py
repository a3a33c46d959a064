"""Encoder registry: `build_encoder(kind, variant, **overrides)`.

Variants name an architecture size. Transformer sizes follow ViT (Ti, S, B,
L) and CLIP's text towers (B, L); 'mu' is a micro size for minutes-long CPU
training on 32x32 images and short byte-level captions. A ViT variant may
carry its patch size after a slash ('B/16'); `build_encoder('vit', 'B')`
uses patch 16.
"""
import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax import registry as registry_lib
from mmjax.models import audio as audio_lib
from mmjax.models import mlp as mlp_lib
from mmjax.models import text as text_lib
from mmjax.models import timeseries as timeseries_lib
from mmjax.models import vit as vit_lib

# ViT sizes (Dosovitskiy et al. 2021; Ti/S from DeiT): width, depth, heads;
# MLP is 4 x width.
_VIT_SIZES = {
    'mu': dict(width=128, depth=2, num_heads=4),
    'Ti': dict(width=192, depth=12, num_heads=3),
    'S': dict(width=384, depth=12, num_heads=6),
    'B': dict(width=768, depth=12, num_heads=12),
    'L': dict(width=1024, depth=24, num_heads=16),
}

# Text towers: CLIP's B and L (vocabulary 49,408 and 77 positions), and the
# micro size for the byte tokenizer (vocabulary 259).
_TEXT_SIZES = {
    'mu': dict(width=128, depth=2, num_heads=4, vocab_size=259, max_len=128),
    'S': dict(width=384, depth=12, num_heads=6, vocab_size=49408, max_len=77),
    'B': dict(width=512, depth=12, num_heads=8, vocab_size=49408, max_len=77),
    'L': dict(width=768, depth=12, num_heads=12, vocab_size=49408, max_len=77),
}

# AST (Gong et al. 2021) is a DeiT-B over 128 mel bins and 16x16 patches;
# the micro size uses 64 mel bins and 8x8 patches.
_AUDIO_SIZES = {
    'mu': dict(width=128, depth=2, num_heads=4, n_mels=64, patch_size=(8, 8)),
    'Ti': dict(width=192, depth=12, num_heads=3, n_mels=128,
               patch_size=(16, 16)),
    'S': dict(width=384, depth=12, num_heads=6, n_mels=128,
              patch_size=(16, 16)),
    'B': dict(width=768, depth=12, num_heads=12, n_mels=128,
              patch_size=(16, 16)),
}

_TIMESERIES_SIZES = {
    'mu': dict(width=128, depth=2, num_heads=4),
    'S': dict(width=384, depth=12, num_heads=6),
    'B': dict(width=768, depth=12, num_heads=12),
}

_MLP_SIZES = {
    'mu': dict(width=128, depth=2),
    'S': dict(width=256, depth=3),
    'B': dict(width=512, depth=4),
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """A registered encoder kind: its module class, sizes and defaults."""
  module: Any
  sizes: Dict[str, Dict[str, Any]]
  default_variant: str
  # Extra fields set for a size when no patch is named, e.g. ViT pooling.
  size_defaults: Dict[str, Dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  # Name of the field a '/N' suffix sets, or None when not allowed.
  patch_field: Optional[str] = None
  default_patch: Dict[str, Any] = dataclasses.field(default_factory=dict)


# kind -> Entry(EncoderSpec, the module's fields and defaults).
ENCODERS = registry_lib.Registry('encoder kind')
for _kind, _spec in {
    'vit': EncoderSpec(
        module=vit_lib.ViT, sizes=_VIT_SIZES, default_variant='mu',
        size_defaults={'mu': dict(pool='gap')},
        patch_field='patch_size',
        default_patch={'mu': 4, 'Ti': 16, 'S': 16, 'B': 16, 'L': 16}),
    'text': EncoderSpec(
        module=text_lib.TextTransformer, sizes=_TEXT_SIZES,
        default_variant='mu'),
    'audio': EncoderSpec(
        module=audio_lib.AudioTransformer, sizes=_AUDIO_SIZES,
        default_variant='mu'),
    'timeseries': EncoderSpec(
        module=timeseries_lib.TimeSeriesTransformer, sizes=_TIMESERIES_SIZES,
        default_variant='mu'),
    'mlp': EncoderSpec(
        module=mlp_lib.TabularMLP, sizes=_MLP_SIZES, default_variant='mu'),
}.items():
  ENCODERS.register(_kind, _spec, registry_lib.dataclass_fields(_spec.module))


def variant_config(kind: str, variant: Optional[str] = None
                   ) -> Dict[str, Any]:
  """Returns the module fields a variant sets (before overrides)."""
  spec = ENCODERS.lookup(kind).obj
  variant = spec.default_variant if variant is None else variant
  size, sep, patch = str(variant).partition('/')
  valid = ', '.join(spec.sizes)
  if spec.patch_field:
    valid += ' (optionally with a patch size after a slash, e.g. B/16)'
  if size not in spec.sizes or (sep and not spec.patch_field):
    raise ValueError(
        f'unknown {kind} variant {variant!r}; valid variants: {valid}')
  config = dict(spec.sizes[size])
  config.update(spec.size_defaults.get(size, {}))
  if spec.patch_field:
    if sep:
      if not patch.isdigit() or int(patch) <= 0:
        raise ValueError(
            f'unknown {kind} variant {variant!r}: patch size {patch!r} is not '
            f'a positive integer; valid variants: {valid}')
      config[spec.patch_field] = int(patch)
    elif size in spec.default_patch:
      config[spec.patch_field] = spec.default_patch[size]
  return config


def encoder_fields(kind: str, variant: Optional[str] = None, where: str = '',
                   **overrides) -> Dict[str, Any]:
  """The module fields of an encoder: its variant's, then `overrides` (checked).

  Raises:
    ValueError: unknown kind, variant or override field (the message lists
      the valid ones), or an unknown dtype name.
  """
  config = {k: v for k, v in ENCODERS.lookup(kind, where).fields.items()
            if v is not dataclasses.MISSING}
  config.update(variant_config(kind, variant))
  ENCODERS.check_fields(kind, overrides, where)
  for key, value in overrides.items():
    if key == 'dtype' and isinstance(value, str):
      # Configs name dtypes as strings ('bfloat16').
      try:
        value = jnp.dtype(value)
      except TypeError:
        raise ValueError(
            f'unknown dtype {value!r} for encoder kind {kind!r}') from None
    elif isinstance(value, list):
      value = tuple(value)  # configs give lists; module fields stay hashable
    config[key] = value
  return config


def build_encoder(kind: str, variant: Optional[str] = None,
                  **overrides) -> nn.Module:
  """Builds an encoder module.

  Args:
    kind: one of `ENCODERS`: 'vit' (images/videos), 'text', 'audio'
      (waveforms or log-mel spectrograms), 'timeseries', 'mlp' (tabular).
    variant: a size name ('mu', 'Ti', 'S', 'B', 'L'; ViT also 'B/16');
      None picks the kind's default variant ('mu').
    **overrides: module fields that replace the variant's values (width,
      depth, num_heads, mlp_dim, patch_size, pool, dropout, dtype (a dtype
      or its name, e.g. 'bfloat16'), remat, scan_layers, vocab_size,
      max_len, ...).

  Returns:
    An unbound flax.linen Module; its `width` field (and `output_width`
    property) is the width of the pooled features it returns.

  Raises:
    ValueError: see `encoder_fields`.
  """
  fields = encoder_fields(kind, variant, **overrides)
  return ENCODERS[kind].obj.module(**fields)
