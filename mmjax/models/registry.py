"""Encoder registry: `build_encoder(kind, variant, **overrides)`.

Variants name an architecture size. Transformer sizes follow ViT (Ti, S, B,
L) and CLIP's text towers (B, L); 'mu' is a micro size for minutes-long CPU
training on 32x32 images and short byte-level captions. A ViT variant may
carry its patch size after a slash ('B/16'); `build_encoder('vit', 'B')`
uses patch 16.

Published models have their own variants, which also set what their blocks
compute (activation, LayerNorm epsilon, pooling, CLIP's pre-norm and
bias-free patch embedding), so that their checkpoints load and give the same
numbers (`mmjax.pretrained`, docs/pretrained.md): `vit` 'clip_vit_b32',
'clip_vit_b16', 'clip_vit_l14', 'timm_vit_s16', 'timm_vit_b16', 'siglip_b16';
`text` 'clip_text_b', 'clip_text_l', 'siglip_text_b16'.
"""
import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax import registry as registry_lib
from mmjax.models import audio as audio_lib
from mmjax.models import bert as bert_lib
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

# OpenAI's CLIP image towers (Radford et al. 2021; open_clip's ViT-B-32,
# ViT-B-16, ViT-L-14 configs, at 224 px): QuickGELU as OpenAI trained them
# (open_clip's non-quickgelu models need activation='gelu'), LayerNorm eps 1e-5,
# class token, ln_pre, bias-free patch embedding; the bias-free projection
# (`visual.proj`) is the model's 'linear' head.
_CLIP_VIT = dict(activation='quick_gelu', ln_eps=1e-5, pool='cls',
                 pre_norm=True, patch_bias=False)
# timm's ImageNet ViTs (vit_small/base_patch16_224): exact GELU, eps 1e-6,
# class-token pooling of the final LayerNorm's output (the classifier head is
# not part of the encoder).
_TIMM_VIT = dict(activation='gelu', ln_eps=1e-6, pool='cls', patch_size=16)
_VIT_SIZES.update({
    'clip_vit_b32': dict(width=768, depth=12, num_heads=12, patch_size=32,
                         **_CLIP_VIT),
    'clip_vit_b16': dict(width=768, depth=12, num_heads=12, patch_size=16,
                         **_CLIP_VIT),
    'clip_vit_l14': dict(width=1024, depth=24, num_heads=16, patch_size=14,
                         **_CLIP_VIT),
    'timm_vit_s16': dict(width=384, depth=12, num_heads=6, **_TIMM_VIT),
    'timm_vit_b16': dict(width=768, depth=12, num_heads=12, **_TIMM_VIT),
    # big_vision's SigLIP B/16 image tower (Zhai et al. 2023) at 224 px: no class
    # token, attention pooling (MAP head), tanh GELU, eps 1e-6, no projection.
    'siglip_b16': dict(width=768, depth=12, num_heads=12, patch_size=16,
                       pool='map', activation='gelu_tanh', ln_eps=1e-6),
})

# Text towers: CLIP's B and L (vocabulary 49,408 and 77 positions), and the
# micro size for the byte tokenizer (vocabulary 259).
_TEXT_SIZES = {
    'mu': dict(width=128, depth=2, num_heads=4, vocab_size=259, max_len=128),
    'S': dict(width=384, depth=12, num_heads=6, vocab_size=49408, max_len=77),
    'B': dict(width=512, depth=12, num_heads=8, vocab_size=49408, max_len=77),
    'L': dict(width=768, depth=12, num_heads=12, vocab_size=49408, max_len=77),
}

# CLIP's text towers (OpenAI's BPE: vocabulary 49,408, 77 positions, eos
# 49407 the largest id): causal, pooled at the largest id, no padding mask,
# QuickGELU, eps 1e-5; `text_projection` is the model's 'linear' head.
# SigLIP B/16's (big_vision; SentencePiece vocabulary 32,000, 64 positions):
# bidirectional, every token attended, pooled at the final position, tanh
# GELU, eps 1e-6, a biased projection to the 768-wide embedding; T5's </s> (1)
# ends the text and pads it (data.tokenizer='siglip:PATH').
_CLIP_TEXT = dict(vocab_size=49408, max_len=77, causal=True, pool='argmax',
                  mask_padding=False, activation='quick_gelu', ln_eps=1e-5,
                  eos_id=49407)
_TEXT_SIZES.update({
    'clip_text_b': dict(width=512, depth=12, num_heads=8, **_CLIP_TEXT),
    'clip_text_l': dict(width=768, depth=12, num_heads=12, **_CLIP_TEXT),
    'siglip_text_b16': dict(width=768, depth=12, num_heads=12, vocab_size=32000,
                            max_len=64, causal=False, pool='final',
                            mask_padding=False, activation='gelu_tanh',
                            ln_eps=1e-6, proj_dim=768, proj_bias=True, pad_id=1,
                            eos_id=1),
})

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

# BERT-family towers (`mmjax.models.bert`): all-MiniLM-L6-v2's config.json (a
# 6-layer, 384-wide uncased WordPiece BERT; sentence-transformers pool it by the mean).
_BERT_SIZES = {
    'minilm_l6': dict(width=384, depth=6, num_heads=12, mlp_dim=1536, vocab_size=30522,
                      max_len=512, type_vocab_size=2, pad_id=0, eos_id=102),
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
    'bert': EncoderSpec(
        module=bert_lib.BertEncoder, sizes=_BERT_SIZES, default_variant='minilm_l6'),
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


# Kinds whose encoder reads token ids: the data tokenises its strings for them.
TEXT_KINDS = ('text', 'bert')


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
