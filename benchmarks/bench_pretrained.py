"""Exactness of mmjax's published-checkpoint loaders against the reference libraries.

For every variant, the reference library builds the model with its own random weights
(no download), the weights are saved in that library's file format, mmjax loads the
file (`mmjax.pretrained`), and both sides encode the same random inputs in float32 on
the CPU. Reported: the largest |difference| / largest |reference value| of the image and
text features (before normalisation) and of the logits, and the export round trip.

- clip_vit_b32 / b16 / l14 with clip_text_b / l: open_clip's
  `ViT-{B-32,B-16,L-14}-quickgelu` (OpenAI's architecture), saved as open_clip
  `.safetensors` (B/32 also as a PyTorch `.bin` and as a TorchScript `.pt`, the form of
  OpenAI's files);
- timm_vit_s16 / b16: timm's `vit_{small,base}_patch16_224` (features before the
  classifier), saved as timm `.safetensors` and as a Google-layout `.npz`;
- siglip_b16 with siglip_text_b16: open_clip's `ViT-B-16-SigLIP` (a timm trunk), saved
  as open_clip `.safetensors` and as a big_vision `.npz`.

The `.npz` files are written here from the reference model's weights under the
documented flax names, then read back by the reference library's own big_vision / Google
reader (timm's `_load_weights`, open_clip's `load_big_vision_weights`), which must give
the same features as the model they came from before mmjax reads them: so the layout
mmjax reads is the one those readers define.

open_clip's and timm's SigLIP compute the exact GELU; big_vision, whose weights these
are, the tanh one (mmjax's siglip variants): the reference models here get
`approximate='tanh'` on every GELU.

The export round trip: mmjax params -> `export_open_clip` -> the state dict must equal
the reference model's own, key for key and bit for bit, and load into it with
`strict=True`.

Needs the reference environment of bench_encoders.py (torch, torchvision, timm,
open_clip_torch):

    python benchmarks/bench_pretrained.py [--variants clip_vit_b32,timm_vit_s16,...]
"""
import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_encoders  # noqa: E402  (the torchvision import workaround)

from mmjax import config_lib, models, pretrained  # noqa: E402

IMAGE = 224
BATCH = 2
CLIP_VARIANTS = {
    'clip_vit_b32': ('ViT-B-32-quickgelu', 'clip_text_b', 512),
    'clip_vit_b16': ('ViT-B-16-quickgelu', 'clip_text_b', 512),
    'clip_vit_l14': ('ViT-L-14-quickgelu', 'clip_text_l', 768),
}
TIMM_VARIANTS = {'timm_vit_s16': 'vit_small_patch16_224',
                 'timm_vit_b16': 'vit_base_patch16_224'}
ALL = list(CLIP_VARIANTS) + list(TIMM_VARIANTS) + ['siglip_b16']


def rel(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def np_state(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def build_mmjax(image_variant, text_variant, embed_dim, head, text_len, bias):
  c = config_lib.base_config()
  c.model.embed_dim = embed_dim
  c.model.head = head
  c.model.encoders = {'image': config_lib.encoder('vit', image_variant)}
  if text_variant:
    c.model.encoders['text'] = config_lib.encoder('text', text_variant)
  if bias:
    c.model.logit_bias_init = -10.0
  model = models.build(c.model)
  batch = {'image': jnp.zeros((1, IMAGE, IMAGE, 3))}
  if text_variant:
    batch['text'] = jnp.zeros((1, text_len), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))['params']
  return model, abstract


def mmjax_outputs(model, params, images, tokens):
  batch = {'image': jnp.asarray(images)}
  if tokens is not None:
    batch['text'] = jnp.asarray(tokens, jnp.int32)
  params = jax.tree.map(jnp.asarray, params)
  out = jax.jit(lambda p, b: model.apply({'params': p}, b))(params, batch)
  projected = {}
  for m, f in out.features.items():
    head = params.get(f'heads_{m}', {})
    projected[m] = np.asarray(f @ head['proj']['kernel'] if 'proj' in head else f)
  logits = None
  if tokens is not None:
    logits = np.asarray(out.logit_scale * out.embeddings['image'] @ out.embeddings['text'].T)
    if out.logit_bias is not None:
      logits = logits + float(out.logit_bias)
  return projected, logits


def torch_clip_outputs(torch, model, images, tokens, bias):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    txt = model.encode_text(torch.from_numpy(tokens))
    i_n = img / img.norm(dim=-1, keepdim=True)
    t_n = txt / txt.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * i_n @ t_n.T
    if bias:
      logits = logits + model.logit_bias
  return {'image': img.numpy(), 'text': txt.numpy()}, logits.numpy()


def export_check(torch, model, params, reference_state, text_prefix=None):
  """'exact' when export gives back the reference state dict bit for bit."""
  exported = pretrained.export_open_clip(params, text_prefix=text_prefix)
  keys = set(reference_state)
  if set(exported) != keys:
    return f'keys differ: {sorted(set(exported) ^ keys)[:4]}'
  bad = [k for k in keys if not np.array_equal(exported[k], reference_state[k])]
  if bad:
    return f'{len(bad)} arrays differ, e.g. {bad[0]}'
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in exported.items()}, strict=True)
  return 'exact'


def run_clip(name, torch, open_clip, safetensors_torch, tmp, rng, rows):
  ref_name, text_variant, embed = CLIP_VARIANTS[name]
  model = open_clip.create_model(ref_name, pretrained=None).eval()
  state = np_state(model)
  path = os.path.join(tmp, f'{name}.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              path)
  files = [path]
  if name == 'clip_vit_b32':
    bin_path = os.path.join(tmp, f'{name}.bin')
    torch.save(model.state_dict(), bin_path)
    pt_path = os.path.join(tmp, f'{name}.pt')       # a TorchScript archive, as OpenAI's
    torch.jit.save(torch.jit.script(model), pt_path)
    files += [bin_path, pt_path]
  images = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  tokens = bench_encoders.clip_tokens(rng, BATCH, 77)
  theirs, their_logits = torch_clip_outputs(torch, model, images, tokens, bias=False)
  mm, abstract = build_mmjax(name, text_variant, embed, 'linear', 77, bias=False)
  for file in files:
    params, _ = pretrained.load_model(abstract, file, source='open_clip')
    ours, our_logits = mmjax_outputs(mm, params, images, tokens)
    rows.append((f'{name} + {text_variant}', f'open_clip {ref_name}',
                 os.path.splitext(file)[1], rel(ours['image'], theirs['image']),
                 rel(ours['text'], theirs['text']), rel(our_logits, their_logits),
                 export_check(torch, model, params, state)))


def google_npz_from_timm(state, depth):
  """Google's ViT layout (the names timm's `_load_weights` reads) of a timm state dict."""
  w = {'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
       'embedding/bias': state['patch_embed.proj.bias'], 'cls': state['cls_token'],
       'Transformer/posembed_input/pos_embedding': state['pos_embed'],
       'Transformer/encoder_norm/scale': state['norm.weight'],
       'Transformer/encoder_norm/bias': state['norm.bias'],
       'head/kernel': state['head.weight'].T, 'head/bias': state['head.bias']}
  width = state['norm.weight'].shape[0]
  for i in range(depth):
    b, p = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    heads = width // 64
    w.update(_flax_block(state, b, p, 'norm1', 'attn.qkv', 'attn.proj', 'norm2',
                         'mlp.fc1', 'mlp.fc2', heads, (1, 2, 3)))
  return w


def _flax_block(state, b, p, ln1, qkv, proj, ln2, fc1, fc2, heads, subs):
  """One block in the flax layout from torch names; subs = (attention, ln2, mlp)
  indices: Google (1, 2, 3), big_vision (0, 1, 0)."""
  mha, ln_b, mlp = subs
  qkv_w, qkv_b = state[b + qkv + ('.weight' if qkv.endswith('qkv') else '_weight')], \
      state[b + qkv + ('.bias' if qkv.endswith('qkv') else '_bias')]
  width = qkv_w.shape[1]
  out = {f'{p}LayerNorm_0/scale': state[b + ln1 + '.weight'],
         f'{p}LayerNorm_0/bias': state[b + ln1 + '.bias'],
         f'{p}LayerNorm_{ln_b}/scale': state[b + ln2 + '.weight'],
         f'{p}LayerNorm_{ln_b}/bias': state[b + ln2 + '.bias'],
         f'{p}MlpBlock_{mlp}/Dense_0/kernel': state[b + fc1 + '.weight'].T,
         f'{p}MlpBlock_{mlp}/Dense_0/bias': state[b + fc1 + '.bias'],
         f'{p}MlpBlock_{mlp}/Dense_1/kernel': state[b + fc2 + '.weight'].T,
         f'{p}MlpBlock_{mlp}/Dense_1/bias': state[b + fc2 + '.bias']}
  a = f'{p}MultiHeadDotProductAttention_{mha}/'
  for j, n in enumerate(('query', 'key', 'value')):
    rows = slice(j * width, (j + 1) * width)
    out[f'{a}{n}/kernel'] = qkv_w[rows].T.reshape(width, heads, -1)
    out[f'{a}{n}/bias'] = qkv_b[rows].reshape(heads, -1)
  out[f'{a}out/kernel'] = state[b + proj + '.weight'].T.reshape(heads, -1, width)
  out[f'{a}out/bias'] = state[b + proj + '.bias']
  return out


def run_timm(name, torch, timm, safetensors_torch, tmp, rng, rows):
  ref_name = TIMM_VARIANTS[name]
  model = timm.create_model(ref_name, pretrained=False).eval()
  state = np_state(model)
  path = os.path.join(tmp, f'{name}.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              path)
  images = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    theirs = model.forward_head(model.forward_features(t_images), pre_logits=True).numpy()
  npz = os.path.join(tmp, f'{name}.npz')
  np.savez(npz, **google_npz_from_timm(state, len(model.blocks)))
  # The layout check: timm's own reader of Google's files gives the same model back.
  check = timm.create_model(ref_name, pretrained=False).eval()
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  vision_transformer._load_weights(check, npz)  # pylint: disable=protected-access
  with torch.no_grad():
    again = check.forward_head(check.forward_features(t_images), pre_logits=True).numpy()
  if not np.array_equal(again, theirs):
    raise SystemExit(f'{name}: the .npz written here does not read back in timm')
  vit = models.build_encoder('vit', name)
  abstract = jax.eval_shape(lambda: vit.init(jax.random.key(0),
                                             jnp.zeros((1, IMAGE, IMAGE, 3))))['params']
  for file in (path, npz):
    params, _ = pretrained.load_encoder(abstract, file, source='timm')
    ours = np.asarray(jax.jit(vit.apply)({'params': params}, jnp.asarray(images)))
    rows.append((name, f'timm {ref_name}', os.path.splitext(file)[1], rel(ours, theirs),
                 None, None, '-'))


def big_vision_npz_from_open_clip(state, heads):
  """big_vision's SigLIP layout (the names open_clip's `load_big_vision_weights` reads)
  of open_clip's SigLIP state dict, blocks scanned (stacked) as big_vision saves them."""
  t = 'visual.trunk.'
  w = {'params/img/embedding/kernel': state[t + 'patch_embed.proj.weight'].transpose(2, 3, 1, 0),
       'params/img/embedding/bias': state[t + 'patch_embed.proj.bias'],
       'params/img/pos_embedding': state[t + 'pos_embed'],
       'params/img/Transformer/encoder_norm/scale': state[t + 'norm.weight'],
       'params/img/Transformer/encoder_norm/bias': state[t + 'norm.bias']}
  depth = 1 + max(int(k.split('.')[3]) for k in state if k.startswith(t + 'blocks.'))
  layers = [_flax_block(state, f'{t}blocks.{i}.', 'L/', 'norm1', 'attn.qkv', 'attn.proj',
                        'norm2', 'mlp.fc1', 'mlp.fc2', heads, (0, 1, 0)) for i in range(depth)]
  for k in layers[0]:
    w['params/img/Transformer/encoderblock/' + k[2:]] = np.stack([x[k] for x in layers])
  a, m = t + 'attn_pool.', 'params/img/MAPHead_0/'
  width = state[a + 'q.weight'].shape[0]
  w[m + 'probe'] = state[a + 'latent']
  kv_w, kv_b = state[a + 'kv.weight'], state[a + 'kv.bias']
  parts = {'query': (state[a + 'q.weight'], state[a + 'q.bias']),
           'key': (kv_w[:width], kv_b[:width]), 'value': (kv_w[width:], kv_b[width:])}
  for n, (wt, bs) in parts.items():
    w[f'{m}MultiHeadDotProductAttention_0/{n}/kernel'] = wt.T.reshape(width, heads, -1)
    w[f'{m}MultiHeadDotProductAttention_0/{n}/bias'] = bs.reshape(heads, -1)
  w[f'{m}MultiHeadDotProductAttention_0/out/kernel'] = state[a + 'proj.weight'].T.reshape(
      heads, -1, width)
  w[f'{m}MultiHeadDotProductAttention_0/out/bias'] = state[a + 'proj.bias']
  w[m + 'LayerNorm_0/scale'], w[m + 'LayerNorm_0/bias'] = (state[a + 'norm.weight'],
                                                           state[a + 'norm.bias'])
  for r in (0, 1):
    w[f'{m}MlpBlock_0/Dense_{r}/kernel'] = state[f'{a}mlp.fc{r + 1}.weight'].T
    w[f'{m}MlpBlock_0/Dense_{r}/bias'] = state[f'{a}mlp.fc{r + 1}.bias']
  x = 'params/txt/'
  w[x + 'Embed_0/embedding'] = state['text.token_embedding.weight']
  w[x + 'pos_embedding'] = state['text.positional_embedding'][None]
  w[x + 'Encoder_0/encoder_norm/scale'] = state['text.ln_final.weight']
  w[x + 'Encoder_0/encoder_norm/bias'] = state['text.ln_final.bias']
  w[x + 'head/kernel'] = state['text.text_projection.weight'].T
  w[x + 'head/bias'] = state['text.text_projection.bias']
  depth = 1 + max(int(k.split('.')[3]) for k in state if k.startswith('text.transformer.'))
  layers = [_flax_block(state, f'text.transformer.resblocks.{i}.', 'L/', 'ln_1',
                        'attn.in_proj', 'attn.out_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj',
                        heads, (0, 1, 0)) for i in range(depth)]
  for k in layers[0]:
    w[x + 'Encoder_0/encoderblock/' + k[2:]] = np.stack([y[k] for y in layers])
  w['params/t'] = state['logit_scale'].reshape(1)
  w['params/b'] = state['logit_bias'].reshape(1)
  return w


def tanh_gelu(torch, model):
  for module in model.modules():
    if isinstance(module, torch.nn.GELU):
      module.approximate = 'tanh'
  return model


def run_siglip(torch, open_clip, safetensors_torch, tmp, rng, rows):
  from open_clip import convert as oc_convert  # pylint: disable=g-import-not-at-top
  model = tanh_gelu(torch, open_clip.create_model('ViT-B-16-SigLIP', pretrained=None)).eval()
  state = np_state(model)
  path = os.path.join(tmp, 'siglip_b16.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              path)
  images = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  tokens = rng.integers(0, 32000, (BATCH, 64))
  theirs, their_logits = torch_clip_outputs(torch, model, images, tokens, bias=True)
  npz = os.path.join(tmp, 'siglip_b16.npz')
  np.savez(npz, **big_vision_npz_from_open_clip(state, 12))
  check = tanh_gelu(torch, open_clip.create_model('ViT-B-16-SigLIP', pretrained=None)).eval()
  with torch.no_grad():
    oc_convert.load_big_vision_weights(check, npz)
  again, again_logits = torch_clip_outputs(torch, check, images, tokens, bias=True)
  if not (np.array_equal(again['image'], theirs['image'])
          and np.array_equal(again['text'], theirs['text'])):
    raise SystemExit('siglip: the .npz written here does not read back in open_clip')
  mm, abstract = build_mmjax('siglip_b16', 'siglip_text_b16', 768, 'identity', 64, bias=True)
  for file, source in ((path, 'open_clip'), (npz, 'big_vision')):
    params, _ = pretrained.load_model(abstract, file, source=source)
    ours, our_logits = mmjax_outputs(mm, params, images, tokens)
    rows.append(('siglip_b16 + siglip_text_b16', 'open_clip ViT-B-16-SigLIP',
                 os.path.splitext(file)[1], rel(ours['image'], theirs['image']),
                 rel(ours['text'], theirs['text']), rel(our_logits, their_logits),
                 export_check(torch, model, params, state) if source == 'open_clip' else '-'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(ALL),
                      help=f'comma-separated, of {ALL}')
  args = parser.parse_args()
  timm, _ = bench_encoders.import_references()
  import open_clip  # pylint: disable=g-import-not-at-top
  import safetensors.torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  print(f'backend {jax.default_backend()}, float32; torch {torch.__version__}, timm '
        f'{timm.__version__}, open_clip {open_clip.__version__}; batch {BATCH}, {IMAGE} px')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.variants.split(','):
      if name in CLIP_VARIANTS:
        run_clip(name, torch, open_clip, safetensors_torch, tmp, rng, rows)
      elif name in TIMM_VARIANTS:
        run_timm(name, torch, timm, safetensors_torch, tmp, rng, rows)
      elif name == 'siglip_b16':
        run_siglip(torch, open_clip, safetensors_torch, tmp, rng, rows)
      else:
        raise SystemExit(f'unknown variant {name!r}; valid: {ALL}')
      print(f'{name} done', flush=True)
  fmt = lambda x: '-' if x is None else f'{x:.1e}'  # noqa: E731
  print('| mmjax variant | reference | file | image features | text features | logits '
        '| export round trip |')
  print('|---|---|---|---|---|---|---|')
  worst = 0.0
  for name, ref, ext, img, txt, logits, export in rows:
    worst = max([worst] + [x for x in (img, txt, logits) if x is not None])
    print(f'| {name} | {ref} | {ext} | {fmt(img)} | {fmt(txt)} | {fmt(logits)} | {export} |')
  print(f'largest relative difference {worst:.1e} ({"<=" if worst <= 1e-5 else ">"} 1e-5)')
  if worst > 1e-5 or any(r[6] not in ('exact', '-') for r in rows):
    raise SystemExit(1)


if __name__ == '__main__':
  main()
