"""open_clip / OpenAI CLIP state dicts <-> mmjax params.

Names (open_clip's `CLIP.state_dict()`, the same as OpenAI's and as open_clip's files
on the Hugging Face hub; `CustomTextCLIP` puts the text tower under `text.`):

| checkpoint | mmjax |
|---|---|
| `visual.conv1.weight` [D, 3, p, p] | image tower `embedding/kernel` [p, p, 3, D] |
| `visual.class_embedding` [D] | `cls` [1, 1, D] |
| `visual.positional_embedding` [N, D] | `pos_embedding` [1, N, D] |
| `visual.ln_pre.*` | `pre_norm` (`pre_norm=True`) |
| `visual.transformer.resblocks.<i>.*` | `encoder/block_<i>` (or row i of `encoder/blocks`) |
| `visual.ln_post.*` | `encoder/encoder_norm` |
| `visual.proj` [D, E] | the model's image head `proj/kernel` (head 'linear') |
| `token_embedding.weight` [V, D] | text tower `token_embedding/embedding` |
| `positional_embedding` [L, D] | `pos_embedding` [L, D] |
| `transformer.resblocks.<i>.*` | `encoder/block_<i>` |
| `ln_final.*` | `encoder/encoder_norm` |
| `text_projection` [D, E] | the model's text head `proj/kernel` |
| `text_projection.weight`, `.bias` (SigLIP) | text tower `head` (`proj_dim`, `proj_bias`) |
| `logit_scale`, `logit_bias` | `logit_scale` (both the log of the scale), `logit_bias` |

CLIP's patch embedding has no bias (`patch_bias=False`). A block: `ln_1` -> `ln_attn`,
`attn.in_proj_weight` / `in_proj_bias` (query, key,
value rows) -> `attn/{query,key,value}`, `attn.out_proj` -> `attn/out`, `ln_2` ->
`ln_mlp`, `mlp.c_fc` -> `mlp/fc1`, `mlp.c_proj` -> `mlp/fc2`.

open_clip's SigLIP models keep the image tower as a timm ViT under `visual.trunk.`
(`mmjax.pretrained.timm_vit`'s names).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from mmjax.pretrained import convert as c
from mmjax.pretrained import timm_vit

TOWERS = ('image', 'text')
# Numbers OpenAI's TorchScript archives keep beside the weights (not loaded), and
# attention-mask buffers.
METADATA = ('input_resolution', 'context_length', 'vocab_size')
SCALARS = {'logit_scale': ('model', 'logit_scale'), 'logit_bias': ('model', 'logit_bias')}

# (width, depth, patch) -> the mmjax variant of OpenAI's image towers.
CLIP_IMAGE_VARIANTS = {(768, 12, 32): ('ViT-B/32', 'clip_vit_b32'),
                       (768, 12, 16): ('ViT-B/16', 'clip_vit_b16'),
                       (1024, 24, 14): ('ViT-L/14', 'clip_vit_l14')}
CLIP_TEXT_VARIANTS = {(512, 12): ('text B', 'clip_text_b'),
                      (768, 12): ('text L', 'clip_text_l')}


def _text_prefix(keys: Iterable[str]) -> str:
  return 'text.' if any(k.startswith('text.') for k in keys) else ''


def tower_of(key: str, text_prefix: str) -> str | None:
  """'image', 'text', 'scalar' or None (a name this layout does not know)."""
  if key in METADATA or key.endswith('attn_mask'):
    return 'metadata'
  if key.startswith('visual.'):
    return 'image'
  if key in SCALARS:
    return 'scalar'
  body = key[len(text_prefix):] if key.startswith(text_prefix) else None
  if body is not None and body.split('.')[0] in (
      'token_embedding', 'positional_embedding', 'transformer', 'ln_final',
      'text_projection'):
    return 'text'
  return None


def resblock_rules(prefix: str, path: c.Path, num_heads: int) -> list[c.Rule]:
  return (c.torch_layernorm(prefix + 'ln_1.', path + ('ln_attn',))
          + c.torch_attention(prefix + 'attn.in_proj_weight', prefix + 'attn.in_proj_bias',
                              prefix + 'attn.out_proj.', path + ('attn',), num_heads)
          + c.torch_layernorm(prefix + 'ln_2.', path + ('ln_mlp',))
          + c.torch_linear(prefix + 'mlp.c_fc.', path + ('mlp', 'fc1'))
          + c.torch_linear(prefix + 'mlp.c_proj.', path + ('mlp', 'fc2')))


def image_rules(*, depth: int, num_heads: int, width: int, tokens: int,
                projection: bool) -> list[c.Rule]:
  """The rules of CLIP's image tower (`visual.`) of this size."""
  t = ('tower',)
  rules = [c.transposed('visual.conv1.weight', t + ('embedding', 'kernel'), (2, 3, 1, 0)),
           c.reshape_rule('visual.class_embedding', t + ('cls',), (width,), (1, 1, width)),
           c.reshape_rule('visual.positional_embedding', t + ('pos_embedding',),
                          (tokens, width), (1, tokens, width))]
  rules += c.torch_layernorm('visual.ln_pre.', t + ('pre_norm',))
  for i in range(depth):
    rules += resblock_rules(f'visual.transformer.resblocks.{i}.',
                            t + ('encoder', f'block_{i}'), num_heads)
  rules += c.torch_layernorm('visual.ln_post.', t + ('encoder', 'encoder_norm'))
  if projection:
    rules.append(c.same('visual.proj', ('head', 'proj', 'kernel')))
  return rules


def text_rules(*, prefix: str, depth: int, num_heads: int, width: int, length: int,
               projection: str | None) -> list[c.Rule]:
  """The rules of CLIP's text tower; `projection`: None, 'matrix' (CLIP's
  `text_projection` parameter, the model's head) or 'linear' / 'linear_bias'
  (SigLIP's `text_projection` Linear, the tower's own head)."""
  del width, length
  t = ('tower',)
  rules = [c.same(prefix + 'token_embedding.weight', t + ('token_embedding', 'embedding')),
           c.same(prefix + 'positional_embedding', t + ('pos_embedding',))]
  for i in range(depth):
    rules += resblock_rules(f'{prefix}transformer.resblocks.{i}.',
                            t + ('encoder', f'block_{i}'), num_heads)
  rules += c.torch_layernorm(prefix + 'ln_final.', t + ('encoder', 'encoder_norm'))
  if projection == 'matrix':
    rules.append(c.same(prefix + 'text_projection', ('head', 'proj', 'kernel')))
  elif projection in ('linear', 'linear_bias'):
    rules += c.torch_linear(prefix + 'text_projection.', t + ('head',),
                            bias=projection == 'linear_bias')
  return rules


def _image_facts(state: Mapping) -> dict:
  weight = state['visual.conv1.weight']
  return dict(width=int(weight.shape[0]), patch=int(weight.shape[-1]),
              depth=c.block_count(state, r'visual\.transformer\.resblocks\.(\d+)\.'),
              tokens=int(state['visual.positional_embedding'].shape[0]), cls=True)


def rules_for(state: Mapping, tower: str, target: Mapping[c.Path, c.Spec], *,
              where: str) -> list[c.Rule]:
  """The rules that load checkpoint `tower` into `target` (an unrolled flat Spec
  tree with roots 'tower' / 'head'); an architecture that differs is an error naming
  both."""
  keys = list(state)
  if tower == 'image':
    if any(k.startswith('visual.trunk.') for k in keys):
      return timm_vit.torch_rules(state, target, prefix='visual.trunk.', where=where)
    if 'visual.conv1.weight' not in state:
      raise c.CheckpointMismatchError(
          f'{where}: the checkpoint has no CLIP image tower (no visual.conv1.weight; '
          f'its keys start {sorted(keys)[:5]})')
    facts = _image_facts(state)
    timm_vit.check_vit(facts, target, where=where, variants=CLIP_IMAGE_VARIANTS)
    return image_rules(depth=facts['depth'], num_heads=c.heads_of(target, ('tower',)),
                       width=facts['width'], tokens=facts['tokens'],
                       projection='visual.proj' in state)
  if tower != 'text':
    raise ValueError(f'{where}: open_clip checkpoints have towers {TOWERS}, not {tower!r}')
  prefix = _text_prefix(keys)
  name = prefix + 'token_embedding.weight'
  if name not in state:
    raise c.CheckpointMismatchError(
        f'{where}: the checkpoint has no CLIP text tower (no {name})')
  vocab, width = (int(n) for n in state[name].shape)
  depth = c.block_count(state, re.escape(prefix) + r'transformer\.resblocks\.(\d+)\.')
  length = int(state[prefix + 'positional_embedding'].shape[0])
  check_text(dict(width=width, depth=depth, vocab=vocab, length=length), target,
             where=where, variants=CLIP_TEXT_VARIANTS)
  if prefix + 'text_projection' in state:
    projection = 'matrix'
  elif prefix + 'text_projection.weight' in state:
    projection = ('linear_bias' if prefix + 'text_projection.bias' in state else 'linear')
  else:
    projection = None
  return text_rules(prefix=prefix, depth=depth, num_heads=c.heads_of(target, ('tower',)),
                    width=width, length=length, projection=projection)


def check_text(facts: Mapping, target: Mapping[c.Path, c.Spec], *, where: str,
               variants: Mapping) -> None:
  """Raises when the checkpoint's text tower is not the model's size."""
  emb = target.get(('tower', 'token_embedding', 'embedding'))
  pos = target.get(('tower', 'pos_embedding'))
  if emb is None or pos is None:
    raise c.CheckpointMismatchError(f'{where}: the model tower is not a text transformer')
  ours = dict(width=int(emb.shape[1]), vocab=int(emb.shape[0]),
              depth=c.block_count((c._name(p) for p in target), r'tower/encoder/block_(\d+)/'),
              length=int(pos.shape[-2]))

  def say(f):
    name = variants.get((f['width'], f['depth']), (None,))[0]
    size = f"{name} " if name else ''
    return (f"{size}(width {f['width']}, depth {f['depth']}, vocabulary {f['vocab']}, "
            f"{f['length']} positions)")

  if any(ours[k] != facts[k] for k in ours):
    hint = variants.get((facts['width'], facts['depth']))
    hint = f"; variant '{hint[1]}' has the checkpoint's size" if hint else ''
    raise c.CheckpointMismatchError(
        f"{where}: the checkpoint's text tower is {say(facts)} but the model's is "
        f"{say(ours)}{hint}")


def export_rules(flat: Mapping[c.Path, object], tower: str, *, text_prefix: str = ''
                 ) -> list[c.Rule]:
  """The rules that write an mmjax tower (unrolled flat tree with roots 'tower' /
  'head') in open_clip's layout: CLIP's for class-token towers, the timm trunk for
  MAP-pooled ones (SigLIP)."""
  t = ('tower',)
  names = {c._name(p) for p in flat}
  depth = c.block_count(names, r'tower/encoder/block_(\d+)/')
  heads = c.heads_of(flat, t)
  if tower == 'image':
    if ('tower', 'map_head', 'probe') in flat:
      return timm_vit.export_rules(flat, prefix='visual.trunk.')
    pos = flat[t + ('pos_embedding',)]
    if t + ('cls',) not in flat or t + ('pre_norm', 'scale') not in flat or (
        t + ('embedding', 'bias') in flat):
      raise c.CheckpointMismatchError(
          "open_clip's CLIP image tower has a class token, ln_pre and a bias-free patch "
          "embedding: export needs a ViT with pool='cls', pre_norm=True, "
          'patch_bias=False (the clip_vit_* variants)')
    return image_rules(depth=depth, num_heads=heads, width=int(pos.shape[-1]),
                       tokens=int(pos.shape[-2]),
                       projection=('head', 'proj', 'kernel') in flat)
  if ('tower', 'head', 'kernel') in flat:
    projection = 'linear_bias' if ('tower', 'head', 'bias') in flat else 'linear'
  elif ('head', 'proj', 'kernel') in flat:
    projection = 'matrix'
  else:
    projection = None
  pos = flat[t + ('pos_embedding',)]
  return text_rules(prefix=text_prefix, depth=depth, num_heads=heads,
                    width=int(pos.shape[-1]), length=int(pos.shape[-2]),
                    projection=projection)
