"""timm ViT checkpoints (PyTorch names, `.safetensors` / `.bin`) and flax-layout ViT
checkpoints (`.npz`: Google's ViT / timm's AugReg files, big_vision's) <-> mmjax.

timm's names (`VisionTransformer.state_dict()`):

| checkpoint | mmjax ViT |
|---|---|
| `patch_embed.proj.weight` [D, 3, p, p], `.bias` | `embedding/kernel` [p, p, 3, D], `bias` |
| `cls_token` [1, 1, D] | `cls` (pool='cls') |
| `pos_embed` [1, N, D] | `pos_embedding` |
| `norm_pre.*` | `pre_norm` |
| `blocks.<i>.norm1`, `attn.qkv`, `attn.proj` | `encoder/block_<i>/ln_attn`, `attn/*`, `attn/out` |
| `blocks.<i>.norm2`, `mlp.fc1`, `mlp.fc2` | `encoder/block_<i>/ln_mlp`, `mlp/fc1`, `mlp/fc2` |
| `norm.*` | `encoder/encoder_norm` |
| `attn_pool.latent`, `q`, `kv`, `proj` | `map_head/probe`, `attn/query`, `key`+`value`, `out` |
| `attn_pool.norm`, `mlp.fc1`, `mlp.fc2` | `map_head/ln`, `mlp/fc1`, `mlp/fc2` (pool='map') |
| `head.weight`, `head.bias` | not loaded: the ImageNet classifier, after the features |

The flax layout already has mmjax's shapes: `embedding`, `cls`, `pos_embedding` (big_vision)
or `Transformer/posembed_input/pos_embedding` (Google), `Transformer/encoderblock_<i>/`
`LayerNorm_0`, `MultiHeadDotProductAttention_{0|1}`, `LayerNorm_{1|2}`, `MlpBlock_{0|3}/
Dense_{0,1}` (big_vision | Google), `Transformer/encoder_norm`, `MAPHead_0/...`; a scanned
big_vision file stacks the blocks in `Transformer/encoderblock/` (split here into layers).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mmjax.pretrained import convert as c

# (width, depth, patch) -> (name, the mmjax variant) of timm's and SigLIP's towers.
VARIANTS = {(384, 12, 16): ('ViT-S/16', 'timm_vit_s16'),
            (768, 12, 16): ('ViT-B/16', 'timm_vit_b16 or siglip_b16'),
            (768, 12, 32): ('ViT-B/32', 'clip_vit_b32'),
            (1024, 24, 14): ('ViT-L/14', 'clip_vit_l14')}
_SIZES = {(192, 12): 'Ti', (384, 12): 'S', (768, 12): 'B', (1024, 24): 'L', (1280, 32): 'H'}
CLASSIFIER_KEYS = ('head.weight', 'head.bias')
FLAX_CLASSIFIER = re.compile(r'(head|pre_logits)/(kernel|bias)$')


def describe(facts: Mapping) -> str:
  """'ViT-B/32 (width 768, depth 12, patch 32, 50 positions: 7x7 patches + class token,
  224 px)'."""
  size = _SIZES.get((facts['width'], facts['depth']))
  name = f"ViT-{size}/{facts['patch']} " if size else 'ViT '
  patches = facts['tokens'] - (1 if facts['cls'] else 0)
  side = int(round(patches ** 0.5))
  grid = (f"{side}x{side} patches{' + class token' if facts['cls'] else ''}, "
          f"{side * facts['patch']} px" if side * side == patches else f'{patches} patches')
  return (f"{name}(width {facts['width']}, depth {facts['depth']}, patch {facts['patch']}, "
          f"{facts['tokens']} positions: {grid})")


def target_facts(target: Mapping[c.Path, c.Spec], *, where: str) -> dict:
  """The ViT facts of an (unrolled) target tower."""
  t = ('tower',)
  kernel = target.get(t + ('embedding', 'kernel'))
  pos = target.get(t + ('pos_embedding',))
  if kernel is None or pos is None or len(kernel.shape) != 4:
    raise c.CheckpointMismatchError(
        f"{where}: the model's tower is not a ViT with a patch embedding (stem='patch') "
        'over images')
  return dict(width=int(kernel.shape[-1]), patch=int(kernel.shape[0]),
              depth=c.block_count((c._name(p) for p in target), r'tower/encoder/block_(\d+)/'),
              tokens=int(pos.shape[1]), cls=t + ('cls',) in target,
              map=t + ('map_head', 'probe') in target,
              pre_norm=t + ('pre_norm', 'scale') in target)


def check_vit(facts: Mapping, target: Mapping[c.Path, c.Spec], *, where: str,
              variants: Mapping = VARIANTS) -> None:
  """Raises when the checkpoint's image tower is not the model's architecture (another
  size or patch, image size, class token), naming both."""
  ours = target_facts(target, where=where)
  keys = ('width', 'depth', 'patch', 'tokens', 'cls')
  if any(ours[k] != facts[k] for k in keys):
    hint = variants.get((facts['width'], facts['depth'], facts['patch']))
    hint = f"; variant '{hint[1]}' has the checkpoint's architecture" if hint else ''
    extra = ''
    if ours['cls'] != facts['cls']:
      extra = (" (the checkpoint's tower has a class token: pool='cls')" if facts['cls']
               else " (the checkpoint's tower has no class token: pool='map' or 'gap')")
    elif ours['tokens'] != facts['tokens'] and all(
        ours[k] == facts[k] for k in ('width', 'depth', 'patch')):
      extra = ' (another image size: initialise the model with the checkpoint\'s)'
    raise c.CheckpointMismatchError(
        f"{where}: the checkpoint's image tower is {describe(facts)} but the model's is "
        f'{describe(ours)}{extra}{hint}')


def _torch_facts(state: Mapping, prefix: str) -> dict:
  weight = state[prefix + 'patch_embed.proj.weight']
  return dict(width=int(weight.shape[0]), patch=int(weight.shape[-1]),
              depth=c.block_count(state, re.escape(prefix) + r'blocks\.(\d+)\.'),
              tokens=int(state[prefix + 'pos_embed'].shape[1]),
              cls=prefix + 'cls_token' in state,
              map=prefix + 'attn_pool.latent' in state,
              pre_norm=prefix + 'norm_pre.weight' in state)


def _torch_tower_rules(facts: Mapping, prefix: str, num_heads: int) -> list[c.Rule]:
  t = ('tower',)
  p = prefix
  rules = [c.transposed(p + 'patch_embed.proj.weight', t + ('embedding', 'kernel'),
                        (2, 3, 1, 0)),
           c.same(p + 'patch_embed.proj.bias', t + ('embedding', 'bias')),
           c.same(p + 'pos_embed', t + ('pos_embedding',))]
  if facts['cls']:
    rules.append(c.same(p + 'cls_token', t + ('cls',)))
  if facts['pre_norm']:
    rules += c.torch_layernorm(p + 'norm_pre.', t + ('pre_norm',))
  for i in range(facts['depth']):
    b, path = f'{p}blocks.{i}.', t + ('encoder', f'block_{i}')
    rules += (c.torch_layernorm(b + 'norm1.', path + ('ln_attn',))
              + c.torch_attention(b + 'attn.qkv.weight', b + 'attn.qkv.bias',
                                  b + 'attn.proj.', path + ('attn',), num_heads)
              + c.torch_layernorm(b + 'norm2.', path + ('ln_mlp',))
              + c.torch_linear(b + 'mlp.fc1.', path + ('mlp', 'fc1'))
              + c.torch_linear(b + 'mlp.fc2.', path + ('mlp', 'fc2')))
  rules += c.torch_layernorm(p + 'norm.', t + ('encoder', 'encoder_norm'))
  if facts['map']:
    a, path = p + 'attn_pool.', t + ('map_head',)
    rules.append(c.same(a + 'latent', path + ('probe',)))
    rules += c.torch_in_proj(a + 'q.weight', a + 'q.bias', path + ('attn',), num_heads,
                             ('query',))
    rules += c.torch_in_proj(a + 'kv.weight', a + 'kv.bias', path + ('attn',), num_heads,
                             ('key', 'value'))
    rules += c.torch_out_proj(a + 'proj.', path + ('attn', 'out'), num_heads)
    rules += c.torch_layernorm(a + 'norm.', path + ('ln',))
    rules += c.torch_linear(a + 'mlp.fc1.', path + ('mlp', 'fc1'))
    rules += c.torch_linear(a + 'mlp.fc2.', path + ('mlp', 'fc2'))
  return rules


def torch_rules(state: Mapping, target: Mapping[c.Path, c.Spec], *, prefix: str = '',
                where: str) -> list[c.Rule]:
  """The rules that load a timm ViT (names under `prefix`) into the target tower."""
  if prefix + 'patch_embed.proj.weight' not in state:
    raise c.CheckpointMismatchError(
        f'{where}: the checkpoint has no timm ViT (no {prefix}patch_embed.proj.weight; '
        f'its keys start {sorted(state)[:5]})')
  facts = _torch_facts(state, prefix)
  check_vit(facts, target, where=where)
  return _torch_tower_rules(facts, prefix, c.heads_of(target, ('tower',)))


def export_rules(flat: Mapping[c.Path, object], *, prefix: str = '') -> list[c.Rule]:
  """The rules that write an mmjax ViT (unrolled, root 'tower') with timm's names."""
  facts = target_facts({p: c.spec_of(a) for p, a in flat.items()}, where='export')
  return _torch_tower_rules(facts, prefix, c.heads_of(flat, ('tower',)))


def split_scanned(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's scanned blocks (`.../encoderblock/...` with a leading depth axis) as
  one key per layer (`.../encoderblock_<i>/...`); other keys as they are."""
  out = {}
  for key, value in state.items():
    if '/encoderblock/' in key:
      head, tail = key.split('/encoderblock/', 1)
      for i in range(value.shape[0]):
        out[f'{head}/encoderblock_{i}/{tail}'] = value[i]
    else:
      out[key] = value
  return out


def flax_block_rules(prefix: str, path: c.Path, style: str) -> list[c.Rule]:
  """One encoder block in the flax layout: style 'big_vision' or 'google'."""
  mha, ln2, mlp = (0, 1, 0) if style == 'big_vision' else (1, 2, 3)
  return (c.flax_layernorm(f'{prefix}LayerNorm_0/', path + ('ln_attn',))
          + c.flax_attention(f'{prefix}MultiHeadDotProductAttention_{mha}/', path + ('attn',))
          + c.flax_layernorm(f'{prefix}LayerNorm_{ln2}/', path + ('ln_mlp',))
          + c.flax_dense(f'{prefix}MlpBlock_{mlp}/Dense_0/', path + ('mlp', 'fc1'))
          + c.flax_dense(f'{prefix}MlpBlock_{mlp}/Dense_1/', path + ('mlp', 'fc2')))


def flax_prefix(state: Mapping) -> str:
  """Where a flax-layout ViT's names start: '', 'params/', 'params/img/', 'img/' or
  'opt/target/'."""
  for prefix in ('', 'params/', 'params/img/', 'img/', 'opt/target/'):
    if prefix + 'embedding/kernel' in state:
      return prefix
  raise c.CheckpointMismatchError(
      'the checkpoint has no flax-layout ViT (no embedding/kernel under any of '
      f"'', params/, params/img/, img/; its keys start {sorted(state)[:5]})")


def flax_rules(state: Mapping, target: Mapping[c.Path, c.Spec], *, prefix: str,
               where: str) -> list[c.Rule]:
  """The rules that load a flax-layout ViT (scanned blocks already split) under
  `prefix` into the target tower."""
  p = prefix
  style = 'big_vision' if p + 'pos_embedding' in state else 'google'
  pos_key = p + ('pos_embedding' if style == 'big_vision'
                 else 'Transformer/posembed_input/pos_embedding')
  kernel = state[p + 'embedding/kernel']
  facts = dict(width=int(kernel.shape[-1]), patch=int(kernel.shape[0]),
               depth=c.block_count(state, re.escape(p) + r'Transformer/encoderblock_(\d+)/'),
               tokens=int(state[pos_key].shape[1]), cls=p + 'cls' in state)
  check_vit(facts, target, where=where)
  t = ('tower',)
  rules = c.flax_dense(p + 'embedding/', t + ('embedding',),
                       bias=p + 'embedding/bias' in state)
  rules.append(c.same(pos_key, t + ('pos_embedding',)))
  if facts['cls']:
    rules.append(c.same(p + 'cls', t + ('cls',)))
  for i in range(facts['depth']):
    rules += flax_block_rules(f'{p}Transformer/encoderblock_{i}/',
                              t + ('encoder', f'block_{i}'), style)
  rules += c.flax_layernorm(p + 'Transformer/encoder_norm/', t + ('encoder', 'encoder_norm'))
  if p + 'MAPHead_0/probe' in state:
    m, path = p + 'MAPHead_0/', t + ('map_head',)
    rules.append(c.same(m + 'probe', path + ('probe',)))
    rules += c.flax_attention(m + 'MultiHeadDotProductAttention_0/', path + ('attn',))
    rules += c.flax_layernorm(m + 'LayerNorm_0/', path + ('ln',))
    rules += c.flax_dense(m + 'MlpBlock_0/Dense_0/', path + ('mlp', 'fc1'))
    rules += c.flax_dense(m + 'MlpBlock_0/Dense_1/', path + ('mlp', 'fc2'))
  return rules
