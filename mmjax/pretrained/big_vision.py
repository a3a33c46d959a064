"""big_vision image-text checkpoints (`.npz`: SigLIP) <-> mmjax params.

Names (flax's, under `params/` in big_vision's files; `/` separates the levels):

| checkpoint | mmjax |
|---|---|
| `img/...` | the image tower: a flax-layout ViT (`timm_vit`); `MAPHead_0` for pool='map' |
| `txt/Embed_0/embedding` [V, D] | text tower `token_embedding/embedding` |
| `txt/pos_embedding` [1, L, D] | `pos_embedding` [L, D] |
| `txt/Encoder_0/encoderblock_<i>/...` (scanned: `encoderblock/`) | `encoder/block_<i>` |
| `txt/Encoder_0/encoder_norm` | `encoder/encoder_norm` |
| `txt/head/kernel`, `bias` | text tower `head` (`proj_dim`, `proj_bias=True`) |
| `t` [1], `b` [1] | `logit_scale` (the log of the scale), `logit_bias` |
"""

from __future__ import annotations

import re
from typing import Mapping

from mmjax.pretrained import convert as c
from mmjax.pretrained import open_clip
from mmjax.pretrained import timm_vit

TOWERS = ('image', 'text')
TEXT_VARIANTS = {(768, 12): ('SigLIP text B', 'siglip_text_b16')}


def root(state: Mapping) -> str:
  """'params/' when the names start there (big_vision's files), else ''."""
  return 'params/' if any(k.startswith('params/') for k in state) else ''


def tower_of(key: str, prefix: str) -> str | None:
  body = key[len(prefix):] if key.startswith(prefix) else None
  if body is None:
    return None
  if body.startswith('img/'):
    return 'image'
  if body.startswith('txt/'):
    return 'text'
  if body in ('t', 'b'):
    return 'scalar'
  return None


def scalar_rules(prefix: str) -> dict[str, c.Rule]:
  return {'logit_scale': c.reshape_rule(prefix + 't', ('model', 'logit_scale'), (1,), ()),
          'logit_bias': c.reshape_rule(prefix + 'b', ('model', 'logit_bias'), (1,), ())}


def text_rules(state: Mapping, target: Mapping[c.Path, c.Spec], *, prefix: str,
               where: str) -> list[c.Rule]:
  p = prefix + 'txt/'
  name = p + 'Embed_0/embedding'
  if name not in state:
    raise c.CheckpointMismatchError(f'{where}: the checkpoint has no text tower (no {name})')
  vocab, width = (int(n) for n in state[name].shape)
  depth = c.block_count(state, re.escape(p) + r'Encoder_0/encoderblock_(\d+)/')
  length = int(state[p + 'pos_embedding'].shape[1])
  open_clip.check_text(dict(width=width, depth=depth, vocab=vocab, length=length), target,
                       where=where, variants=TEXT_VARIANTS)
  t = ('tower',)
  rules = [c.same(name, t + ('token_embedding', 'embedding')),
           c.reshape_rule(p + 'pos_embedding', t + ('pos_embedding',), (1, length, width),
                          (length, width))]
  for i in range(depth):
    rules += timm_vit.flax_block_rules(f'{p}Encoder_0/encoderblock_{i}/',
                                       t + ('encoder', f'block_{i}'), 'big_vision')
  rules += c.flax_layernorm(p + 'Encoder_0/encoder_norm/', t + ('encoder', 'encoder_norm'))
  if p + 'head/kernel' in state:
    rules += c.flax_dense(p + 'head/', t + ('head',), bias=p + 'head/bias' in state)
  return rules


def rules_for(state: Mapping, tower: str, target: Mapping[c.Path, c.Spec], *,
              where: str) -> list[c.Rule]:
  prefix = root(state)
  if tower == 'image':
    if prefix + 'img/embedding/kernel' not in state:
      raise c.CheckpointMismatchError(
          f'{where}: the checkpoint has no image tower (no {prefix}img/embedding/kernel)')
    return timm_vit.flax_rules(state, target, prefix=prefix + 'img/', where=where)
  if tower == 'text':
    return text_rules(state, target, prefix=prefix, where=where)
  raise ValueError(f'{where}: big_vision checkpoints have towers {TOWERS}, not {tower!r}')
