"""Published-checkpoint loaders and exporter (`mmjax.pretrained`) on tiny models.

The fixtures are made here, without torch, open_clip or timm: random state dicts under
each library's names and shapes (open_clip CLIP, timm ViT, Google's and big_vision's
flax layouts, open_clip SigLIP), written to files in each format, and a reference
forward in NumPy written from the published formulas (pre-LN blocks with PyTorch's fused
attention weights, QuickGELU / exact / tanh GELU, class-token, argmax, final-position
and MAP pooling). The real libraries are compared in benchmarks/bench_pretrained.py.
"""

import functools
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from mmjax import config_lib, models, pretrained
from mmjax.pretrained import formats
from mmjax.train import trainer

W, DEPTH, HEADS, PATCH, IMG, EMBED = 16, 2, 2, 4, 8, 8
VOCAB, CTX = 24, 6


# ------------------------------------------------------------------ NumPy reference

def layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


ACT = {'quick_gelu': lambda x: x / (1 + np.exp(-1.702 * x)),
       'gelu': lambda x: 0.5 * x * (1 + special.erf(x / math.sqrt(2))),
       'gelu_tanh': lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi)
                                                     * (x + 0.044715 * x ** 3)))}


def attention(q, k, v, heads, causal=False):
  """q [B, Lq, D], k, v [B, L, D] (projected) -> [B, Lq, D]."""
  b, lq, d = q.shape
  split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa
  s = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  if causal:
    s = np.where(np.tril(np.ones((lq, lq), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, lq, d)


def torch_block(x, sd, p, names, act, eps, heads, causal=False):
  """A pre-LN block with PyTorch's weights: names = (ln1, qkv, out, ln2, fc1, fc2)."""
  ln1, qkv, out, ln2, fc1, fc2 = (p + n for n in names)
  qkv_w = sd[qkv + ('_weight' if qkv.endswith('in_proj') else '.weight')]
  qkv_b = sd[qkv + ('_bias' if qkv.endswith('in_proj') else '.bias')]
  y = layer_norm(x, sd[ln1 + '.weight'], sd[ln1 + '.bias'], eps)
  q, k, v = np.split(y @ qkv_w.T + qkv_b, 3, axis=-1)
  x = x + attention(q, k, v, heads, causal) @ sd[out + '.weight'].T + sd[out + '.bias']
  y = layer_norm(x, sd[ln2 + '.weight'], sd[ln2 + '.bias'], eps)
  y = act(y @ sd[fc1 + '.weight'].T + sd[fc1 + '.bias'])
  return x + y @ sd[fc2 + '.weight'].T + sd[fc2 + '.bias']


def patchify(images, weight, bias=None):
  """A stride-p convolution with PyTorch's weight [D, C, p, p] -> tokens [B, N, D]."""
  b, h, w, c = images.shape
  p = weight.shape[-1]
  x = images.reshape(b, h // p, p, w // p, p, c)
  out = np.einsum('bhiwjc,dcij->bhwd', x, weight).reshape(b, -1, weight.shape[0])
  return out if bias is None else out + bias


OC_NAMES = ('ln_1', 'attn.in_proj', 'attn.out_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj')
TIMM_NAMES = ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')


def clip_reference(sd, images, tokens, act='quick_gelu', eps=1e-5):
  """open_clip's CLIP: (image features, text features, logits), before normalisation."""
  a = ACT[act]
  x = patchify(images, sd['visual.conv1.weight'])
  cls = np.broadcast_to(sd['visual.class_embedding'], (x.shape[0], 1, W))
  x = np.concatenate([cls, x], 1) + sd['visual.positional_embedding']
  x = layer_norm(x, sd['visual.ln_pre.weight'], sd['visual.ln_pre.bias'], eps)
  for i in range(DEPTH):
    x = torch_block(x, sd, f'visual.transformer.resblocks.{i}.', OC_NAMES, a, eps, HEADS)
  image = layer_norm(x[:, 0], sd['visual.ln_post.weight'], sd['visual.ln_post.bias'], eps)
  image = image @ sd['visual.proj']
  x = sd['token_embedding.weight'][tokens] + sd['positional_embedding'][:tokens.shape[1]]
  for i in range(DEPTH):
    x = torch_block(x, sd, f'transformer.resblocks.{i}.', OC_NAMES, a, eps, HEADS,
                    causal=True)
  x = layer_norm(x, sd['ln_final.weight'], sd['ln_final.bias'], eps)
  text = x[np.arange(len(tokens)), tokens.argmax(-1)] @ sd['text_projection']
  return image, text, logits(image, text, sd['logit_scale'])


def logits(image, text, scale, bias=0.0):
  norm = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
  return np.exp(scale) * norm(image) @ norm(text).T + bias


def timm_reference(sd, images):
  x = patchify(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'])
  cls = np.broadcast_to(sd['cls_token'], (x.shape[0], 1, W))
  x = np.concatenate([cls, x], 1) + sd['pos_embed']
  for i in range(DEPTH):
    x = torch_block(x, sd, f'blocks.{i}.', TIMM_NAMES, ACT['gelu'], 1e-6, HEADS)
  return layer_norm(x, sd['norm.weight'], sd['norm.bias'], 1e-6)[:, 0]


def flax_block(x, w, p, act, eps, heads, subs=(0, 1, 0)):
  """A block in big_vision's (subs (0, 1, 0)) or Google's ((1, 2, 3)) flax layout."""
  mha, ln2, mlp = subs
  y = layer_norm(x, w[p + 'LayerNorm_0/scale'], w[p + 'LayerNorm_0/bias'], eps)
  x = x + flax_attention(y, y, w, f'{p}MultiHeadDotProductAttention_{mha}/', heads)
  y = layer_norm(x, w[f'{p}LayerNorm_{ln2}/scale'], w[f'{p}LayerNorm_{ln2}/bias'], eps)
  d = f'{p}MlpBlock_{mlp}/'
  y = act(y @ w[d + 'Dense_0/kernel'] + w[d + 'Dense_0/bias'])
  return x + y @ w[d + 'Dense_1/kernel'] + w[d + 'Dense_1/bias']


def flax_attention(xq, xkv, w, a, heads):
  proj = lambda x, n: (np.einsum('bld,dhk->blhk', x, w[a + n + '/kernel'])  # noqa: E731
                       + w[a + n + '/bias']).reshape(x.shape[0], x.shape[1], -1)
  out = attention(proj(xq, 'query'), proj(xkv, 'key'), proj(xkv, 'value'), heads)
  kernel = w[a + 'out/kernel']
  return out @ kernel.reshape(-1, kernel.shape[-1]) + w[a + 'out/bias']


def siglip_reference(w, images, tokens):
  """big_vision's SigLIP (tanh GELU, eps 1e-6): image (MAP head), text, logits."""
  a, eps, i = ACT['gelu_tanh'], 1e-6, 'params/img/'
  kernel = w[i + 'embedding/kernel']                    # [p, p, C, D]
  x = patchify(images, kernel.transpose(3, 2, 0, 1), w[i + 'embedding/bias'])
  x = x + w[i + 'pos_embedding']
  for layer in range(DEPTH):
    blk = {k.replace('encoderblock/', 'encoderblock_0/'): v[layer] for k, v in w.items()
           if '/img/Transformer/encoderblock/' in k}
    x = flax_block(x, blk, i + 'Transformer/encoderblock_0/', a, eps, HEADS)
  x = layer_norm(x, w[i + 'Transformer/encoder_norm/scale'],
                 w[i + 'Transformer/encoder_norm/bias'], eps)
  m = i + 'MAPHead_0/'
  probe = np.broadcast_to(w[m + 'probe'], (x.shape[0], 1, W))
  y = flax_attention(probe, x, w, m + 'MultiHeadDotProductAttention_0/', HEADS)
  z = layer_norm(y, w[m + 'LayerNorm_0/scale'], w[m + 'LayerNorm_0/bias'], eps)
  z = a(z @ w[m + 'MlpBlock_0/Dense_0/kernel'] + w[m + 'MlpBlock_0/Dense_0/bias'])
  image = (y + z @ w[m + 'MlpBlock_0/Dense_1/kernel'] + w[m + 'MlpBlock_0/Dense_1/bias'])
  image = image[:, 0]
  t = 'params/txt/'
  x = w[t + 'Embed_0/embedding'][tokens] + w[t + 'pos_embedding'][0]
  for layer in range(DEPTH):
    blk = {k.replace('encoderblock/', 'encoderblock_0/'): v[layer] for k, v in w.items()
           if '/txt/Encoder_0/encoderblock/' in k}
    x = flax_block(x, blk, t + 'Encoder_0/encoderblock_0/', a, eps, HEADS)
  x = layer_norm(x, w[t + 'Encoder_0/encoder_norm/scale'],
                 w[t + 'Encoder_0/encoder_norm/bias'], eps)
  text = x[:, -1] @ w[t + 'head/kernel'] + w[t + 'head/bias']
  return image, text, logits(image, text, w['params/t'][0], w['params/b'][0])


# ------------------------------------------------------------------ fixtures

def rand(rng, *shape, scale=0.3):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def torch_block_state(rng, p, names):
  ln1, qkv, out, ln2, fc1, fc2 = (p + n for n in names)
  sep = '_' if qkv.endswith('in_proj') else '.'
  sd = {qkv + sep + 'weight': rand(rng, 3 * W, W), qkv + sep + 'bias': rand(rng, 3 * W),
        out + '.weight': rand(rng, W, W), out + '.bias': rand(rng, W),
        fc1 + '.weight': rand(rng, 4 * W, W), fc1 + '.bias': rand(rng, 4 * W),
        fc2 + '.weight': rand(rng, W, 4 * W), fc2 + '.bias': rand(rng, W)}
  for ln in (ln1, ln2):
    sd[ln + '.weight'], sd[ln + '.bias'] = 1 + rand(rng, W), rand(rng, W)
  return sd


def clip_state(seed=0):
  """A tiny CLIP under open_clip's names (width 16, 2 blocks, patch 4 on 8 px)."""
  rng = np.random.default_rng(seed)
  n = (IMG // PATCH) ** 2 + 1
  sd = {'visual.conv1.weight': rand(rng, W, 3, PATCH, PATCH),
        'visual.class_embedding': rand(rng, W), 'visual.positional_embedding': rand(rng, n, W),
        'visual.proj': rand(rng, W, EMBED), 'token_embedding.weight': rand(rng, VOCAB, W),
        'positional_embedding': rand(rng, CTX, W), 'text_projection': rand(rng, W, EMBED),
        'logit_scale': np.float32(math.log(1 / 0.07)),
        # A buffer OpenAI's TorchScript files keep (open_clip's state dicts do not).
        'attn_mask': np.triu(np.full((CTX, CTX), -np.inf, np.float32), 1)}
  for ln in ('visual.ln_pre', 'visual.ln_post', 'ln_final'):
    sd[ln + '.weight'], sd[ln + '.bias'] = 1 + rand(rng, W), rand(rng, W)
  for i in range(DEPTH):
    sd.update(torch_block_state(rng, f'visual.transformer.resblocks.{i}.', OC_NAMES))
    sd.update(torch_block_state(rng, f'transformer.resblocks.{i}.', OC_NAMES))
  return sd


def timm_state(seed=1):
  rng = np.random.default_rng(seed)
  n = (IMG // PATCH) ** 2 + 1
  sd = {'patch_embed.proj.weight': rand(rng, W, 3, PATCH, PATCH),
        'patch_embed.proj.bias': rand(rng, W), 'cls_token': rand(rng, 1, 1, W),
        'pos_embed': rand(rng, 1, n, W), 'norm.weight': 1 + rand(rng, W),
        'norm.bias': rand(rng, W), 'head.weight': rand(rng, 5, W), 'head.bias': rand(rng, 5)}
  for i in range(DEPTH):
    sd.update(torch_block_state(rng, f'blocks.{i}.', TIMM_NAMES))
  return sd


def flax_block_state(rng, subs=(0, 1, 0)):
  mha, ln2, mlp = subs
  w = {}
  for n in ('query', 'key', 'value'):
    w[f'MultiHeadDotProductAttention_{mha}/{n}/kernel'] = rand(rng, W, HEADS, W // HEADS)
    w[f'MultiHeadDotProductAttention_{mha}/{n}/bias'] = rand(rng, HEADS, W // HEADS)
  w[f'MultiHeadDotProductAttention_{mha}/out/kernel'] = rand(rng, HEADS, W // HEADS, W)
  w[f'MultiHeadDotProductAttention_{mha}/out/bias'] = rand(rng, W)
  for ln in (0, ln2):
    w[f'LayerNorm_{ln}/scale'], w[f'LayerNorm_{ln}/bias'] = 1 + rand(rng, W), rand(rng, W)
  w[f'MlpBlock_{mlp}/Dense_0/kernel'] = rand(rng, W, 4 * W)
  w[f'MlpBlock_{mlp}/Dense_0/bias'] = rand(rng, 4 * W)
  w[f'MlpBlock_{mlp}/Dense_1/kernel'] = rand(rng, 4 * W, W)
  w[f'MlpBlock_{mlp}/Dense_1/bias'] = rand(rng, W)
  return w


def siglip_npz_state(seed=2):
  """A tiny SigLIP in big_vision's layout, blocks scanned as big_vision saves them."""
  rng = np.random.default_rng(seed)
  i, t = 'params/img/', 'params/txt/'
  w = {i + 'embedding/kernel': rand(rng, PATCH, PATCH, 3, W), i + 'embedding/bias': rand(rng, W),
       i + 'pos_embedding': rand(rng, 1, (IMG // PATCH) ** 2, W),
       t + 'Embed_0/embedding': rand(rng, VOCAB, W), t + 'pos_embedding': rand(rng, 1, CTX, W),
       t + 'head/kernel': rand(rng, W, W), t + 'head/bias': rand(rng, W),
       'params/t': np.array([2.3], np.float32), 'params/b': np.array([-10.0], np.float32)}
  for norm in (i + 'Transformer/encoder_norm/', t + 'Encoder_0/encoder_norm/',
               i + 'MAPHead_0/LayerNorm_0/'):
    w[norm + 'scale'], w[norm + 'bias'] = 1 + rand(rng, W), rand(rng, W)
  for stack in (i + 'Transformer/encoderblock/', t + 'Encoder_0/encoderblock/'):
    layers = [flax_block_state(rng) for _ in range(DEPTH)]
    w.update({stack + k: np.stack([x[k] for x in layers]) for k in layers[0]})
  head = flax_block_state(rng)
  m = i + 'MAPHead_0/'
  w[m + 'probe'] = rand(rng, 1, 1, W)
  w.update({m + k: v for k, v in head.items() if k.startswith(('Multi', 'Mlp'))})
  return w


def clip_model(scan=False, **text):
  c = config_lib.base_config()
  c.model.embed_dim = EMBED
  small = dict(width=W, depth=DEPTH, num_heads=HEADS, scan_layers=scan)
  c.model.encoders = {
      'image': config_lib.encoder('vit', 'clip_vit_b32', patch_size=PATCH, **small),
      'text': config_lib.encoder('text', 'clip_text_b', vocab_size=VOCAB, max_len=CTX,
                                 eos_id=VOCAB - 1, **small, **text)}
  return c


def siglip_model(scan=False):
  c = config_lib.base_config()
  c.model.embed_dim = W
  c.model.head = 'identity'
  c.model.logit_bias_init = -10.0
  small = dict(width=W, depth=DEPTH, num_heads=HEADS, scan_layers=scan)
  c.model.encoders = {
      'image': config_lib.encoder('vit', 'siglip_b16', patch_size=PATCH, **small),
      'text': config_lib.encoder('text', 'siglip_text_b16', vocab_size=VOCAB, max_len=CTX,
                                 proj_dim=W, **small)}
  return c


def inputs(seed=3):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((2, IMG, IMG, 3)).astype(np.float32)
  tokens = rng.integers(0, VOCAB - 1, (2, CTX))
  tokens[0, 4], tokens[1, 2] = VOCAB - 1, VOCAB - 1       # eos: the largest id
  return images, tokens


def init(config, images, tokens):
  model = models.build(config.model)
  batch = {'image': jnp.asarray(images), 'text': jnp.asarray(tokens, jnp.int32)}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))['params']
  return model, params, batch


def run(model, params, batch):
  out = jax.jit(model.apply)({'params': jax.tree.map(jnp.asarray, params)}, batch)
  projected = {m: np.asarray(f @ params[f'heads_{m}']['proj']['kernel']
                             if 'proj' in params.get(f'heads_{m}', {}) else f)
               for m, f in out.features.items()}
  scores = out.logit_scale * out.embeddings['image'] @ out.embeddings['text'].T
  if out.logit_bias is not None:
    scores = scores + out.logit_bias
  return projected['image'], projected['text'], np.asarray(scores)


def assert_close(ours, theirs, tol=1e-5):
  for a, b in zip(ours, theirs):
    err = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
    assert err <= tol, err


# ------------------------------------------------------------------ tests

def assert_scanned_is_stacked(scanned, unrolled):
  """Every `encoder/blocks` leaf of `scanned` is the stack of `unrolled`'s block_<i>."""
  for tower in ('towers_image', 'towers_text'):
    blocks = scanned[tower]['encoder'].pop('blocks')
    layers = [unrolled[tower]['encoder'].pop(f'block_{i}') for i in range(DEPTH)]
    jax.tree.map(lambda s, *u: np.testing.assert_array_equal(s, np.stack(u)), blocks,
                 *layers)
  jax.tree.map(np.testing.assert_array_equal, scanned, unrolled)


def assert_exported_is(exported, sd):
  sd = {k: v for k, v in sd.items() if k != 'attn_mask'}
  assert sorted(exported) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_open_clip_safetensors_matches_reference_and_exports_exactly(tmp_path):
  sd = clip_state()
  path = str(tmp_path / 'open_clip_model.safetensors')
  formats.write_safetensors(path, sd)
  images, tokens = inputs()
  model, abstract, batch = init(clip_model(), images, tokens)
  params, report = pretrained.load_model(abstract, path)
  assert report.source == 'open_clip' and report.loaded['logit_scale'] == 1
  assert report.skipped == ['attn_mask']
  assert_close(run(model, params, batch), clip_reference(sd, images, tokens))
  exported = pretrained.export_open_clip(params, str(tmp_path / 'out.safetensors'))
  assert_exported_is(exported, sd)
  again, _ = pretrained.load_model(abstract, str(tmp_path / 'out.safetensors'))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # scan_layers=True: the same arrays stacked, and the same export.
  _, scan_abstract, _ = init(clip_model(scan=True), images, tokens)
  scanned, _ = pretrained.load_model(scan_abstract, path)
  assert_exported_is(pretrained.export_open_clip(scanned), sd)
  assert_scanned_is_stacked(scanned, params)


def test_any_dtype_is_cast_to_the_params_dtype(tmp_path):
  import ml_dtypes
  sd = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in clip_state().items()}
  path = str(tmp_path / 'bf16.safetensors')
  formats.write_safetensors(path, sd)
  images, tokens = inputs()
  _, abstract, _ = init(clip_model(), images, tokens)
  params, _ = pretrained.load_model(abstract, path)
  kernel = params['heads_image']['proj']['kernel']
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, sd['visual.proj'].astype(np.float32))


def test_timm_safetensors_and_google_npz_match_reference(tmp_path):
  sd = timm_state()
  path = str(tmp_path / 'vit.safetensors')
  formats.write_safetensors(path, sd)
  images, _ = inputs()
  vit = models.build_encoder('vit', 'timm_vit_b16', width=W, depth=DEPTH, num_heads=HEADS,
                             patch_size=PATCH)
  abstract = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.asarray(images)))
  params, report = pretrained.load_encoder(abstract['params'], path)
  assert report.source == 'timm' and 'head.weight' in report.skipped
  ours = jax.jit(vit.apply)({'params': params}, jnp.asarray(images))
  assert_close([ours], [timm_reference(sd, images)])
  # The same weights in Google's flax layout (timm's .npz files).
  w = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
       'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
       'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
       'Transformer/encoder_norm/scale': sd['norm.weight'],
       'Transformer/encoder_norm/bias': sd['norm.bias'],
       'head/kernel': sd['head.weight'].T, 'head/bias': sd['head.bias']}
  for i in range(DEPTH):
    b, p = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    qkv_w, qkv_b = sd[b + 'attn.qkv.weight'], sd[b + 'attn.qkv.bias']
    a = p + 'MultiHeadDotProductAttention_1/'
    for j, n in enumerate(('query', 'key', 'value')):
      w[f'{a}{n}/kernel'] = qkv_w[j * W:(j + 1) * W].T.reshape(W, HEADS, -1)
      w[f'{a}{n}/bias'] = qkv_b[j * W:(j + 1) * W].reshape(HEADS, -1)
    w[a + 'out/kernel'] = sd[b + 'attn.proj.weight'].T.reshape(HEADS, -1, W)
    w[a + 'out/bias'] = sd[b + 'attn.proj.bias']
    for ours_ln, theirs_ln in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      w[f'{p}{ours_ln}/scale'] = sd[f'{b}{theirs_ln}.weight']
      w[f'{p}{ours_ln}/bias'] = sd[f'{b}{theirs_ln}.bias']
    for r, fc in enumerate(('fc1', 'fc2')):
      w[f'{p}MlpBlock_3/Dense_{r}/kernel'] = sd[f'{b}mlp.{fc}.weight'].T
      w[f'{p}MlpBlock_3/Dense_{r}/bias'] = sd[f'{b}mlp.{fc}.bias']
  npz = str(tmp_path / 'vit.npz')
  np.savez(npz, **w)
  from_npz, _ = pretrained.load_encoder(abstract['params'], npz, source='timm')
  jax.tree.map(np.testing.assert_array_equal, from_npz, params)


def test_big_vision_siglip_npz_matches_reference(tmp_path):
  w = siglip_npz_state()
  path = str(tmp_path / 'siglip.npz')
  np.savez(path, **w)
  images, tokens = inputs()
  model, abstract, batch = init(siglip_model(), images, tokens)
  params, report = pretrained.load_model(abstract, path)
  assert report.source == 'big_vision' and report.loaded['logit_bias'] == 1
  assert_close(run(model, params, batch), siglip_reference(w, images, tokens))
  # open_clip's layout of the same model (timm trunk, text. prefix) round-trips.
  exported = pretrained.export_open_clip(params)
  assert 'visual.trunk.attn_pool.kv.weight' in exported
  assert 'text.text_projection.bias' in exported
  again, _ = pretrained.load_model(abstract, exported, source='open_clip')
  jax.tree.map(np.testing.assert_array_equal, again, params)
  _, scan_abstract, _ = init(siglip_model(scan=True), images, tokens)
  scanned, _ = pretrained.load_model(scan_abstract, path)
  assert_scanned_is_stacked(scanned, params)


def test_towers_mapping_and_report(tmp_path):
  images, tokens = inputs()
  _, abstract, _ = init(clip_model(), images, tokens)
  params, report = pretrained.load_model(abstract, clip_state(), towers={'image': 'image'},
                                         scalars=False)
  assert set(report.loaded) == {'towers_image', 'heads_image'}
  assert 'logit_scale' in report.kept
  assert 'token_embedding.weight' in report.skipped
  assert isinstance(params['towers_text']['pos_embedding'], jax.ShapeDtypeStruct)
  assert 'heads_image: ' in str(report)
  # One encoder from one tower of an in-memory big_vision state dict (scanned blocks).
  _, siglip, _ = init(siglip_model(), images, tokens)
  w = siglip_npz_state()
  text, report = pretrained.load_encoder(siglip['towers_text'], w, tower='text')
  np.testing.assert_array_equal(text['encoder']['block_1']['mlp']['fc2']['bias'],
                                w['params/txt/Encoder_0/encoderblock/MlpBlock_0/Dense_1/bias'][1])
  np.testing.assert_array_equal(text['head']['bias'], w['params/txt/head/bias'])
  assert 'params/img/embedding/kernel' in report.skipped and 'params/t' in report.skipped


def write_torchscript(path, modules, monkeypatch):
  """A TorchScript archive like OpenAI's CLIP .pt (module objects holding tensors in
  `data.pkl`, storages in `data/`), written with plain pickle: `modules` is a nested
  dict of float32 arrays."""
  import collections
  import io
  import pickle
  import sys
  import types
  fake = {n: types.ModuleType(n) for n in ('torch', 'torch._utils', '__torch__',
                                           '__torch__.model')}
  for name, module in fake.items():
    monkeypatch.setitem(sys.modules, name, module)

  class FloatStorage:
    pass

  def _rebuild_tensor_v2(*args):
    del args

  class CLIP:
    def __init__(self, attributes):
      self.attributes = attributes

    def __reduce__(self):
      return CLIP, (), self.attributes

  for obj, module in ((FloatStorage, 'torch'), (_rebuild_tensor_v2, 'torch._utils'),
                      (CLIP, '__torch__.model')):
    obj.__module__, obj.__qualname__ = module, obj.__name__
    setattr(fake[module], obj.__name__, obj)
  storages = []

  class Tensor:
    def __init__(self, array):
      self.array = array

    def __reduce__(self):
      storages.append(self.array)
      stride = [int(x) // 4 for x in self.array.strides]
      return _rebuild_tensor_v2, (('storage', len(storages) - 1), 0, self.array.shape,
                                  tuple(stride), False, collections.OrderedDict())

  class Writer(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, tuple) and obj[:1] == ('storage',):
        key = obj[1]
        return ('storage', FloatStorage, str(key), 'cpu', storages[key].size)
      return None

  def build(tree):
    return CLIP({k: build(v) if isinstance(v, dict) else Tensor(v) for k, v in tree.items()})

  data = io.BytesIO()
  Writer(data, protocol=2).dump(build(modules))
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('model/data.pkl', data.getvalue())
    z.writestr('model/constants.pkl', pickle.dumps(()))
    for i, array in enumerate(storages):
      z.writestr(f'model/data/{i}', np.ascontiguousarray(array).tobytes())


def test_openai_torchscript_pt_reads_without_torch(tmp_path, monkeypatch):
  sd = clip_state()
  nested = {}
  for key, value in sd.items():
    node = nested
    *parents, leaf = key.split('.')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value, np.float32)
  nested.update(input_resolution=np.array(IMG, np.float32))   # OpenAI's numbers, skipped
  path = str(tmp_path / 'ViT-tiny.pt')
  write_torchscript(path, nested, monkeypatch)
  read = pretrained.read_state_dict(path)
  assert sorted(read) == sorted(list(sd) + ['input_resolution'])
  for k, v in sd.items():
    np.testing.assert_array_equal(read[k], v, err_msg=k)
  images, tokens = inputs()
  _, abstract, _ = init(clip_model(), images, tokens)
  params, report = pretrained.load_model(abstract, path)
  assert 'input_resolution' in report.skipped
  np.testing.assert_array_equal(params['heads_text']['proj']['kernel'], sd['text_projection'])


# ------------------------------------------------------------------ bad input

def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.safetensors does not exist'):
    pretrained.read_state_dict(str(tmp_path / 'nope.safetensors'))
  other = tmp_path / 'model.ckpt'
  other.write_bytes(b'x')
  with pytest.raises(ValueError, match=r'model.ckpt: not a checkpoint file type.*\.npz'):
    pretrained.read_state_dict(str(other))
  broken = tmp_path / 'broken.safetensors'
  broken.write_bytes(b'not a safetensors file at all')
  with pytest.raises(ValueError, match='broken.safetensors is not a readable safetensors'):
    pretrained.read_state_dict(str(broken))
  objects = tmp_path / 'objects.npz'
  np.savez(objects, a=np.array([{'x': 1}], dtype=object))
  with pytest.raises(ValueError, match='objects.npz is not a readable npz'):
    pretrained.read_state_dict(str(objects))


def test_pt_file_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == 'torch' or name.startswith('torch.'):
      raise ImportError('No module named torch')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_torch)
  path = tmp_path / 'ViT-B-32.pt'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', b'')
  with pytest.raises(ImportError,
                     match=r'(?s)needs torch.*safetensors.*ViT-B-32\.safetensors'):
    pretrained.read_state_dict(str(path))


def test_b32_checkpoint_into_b16_model_names_both():
  abstract = {'towers_image': jax.eval_shape(
      lambda: models.build_encoder('vit', 'clip_vit_b16').init(
          jax.random.key(0), jnp.zeros((1, 224, 224, 3))))['params']}
  zeros = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
  state = {'visual.conv1.weight': zeros(768, 3, 32, 32),
           'visual.positional_embedding': zeros(50, 768)}
  state.update({f'visual.transformer.resblocks.{i}.ln_1.weight': zeros(768)
                for i in range(12)})
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r"image tower is ViT-B/32 .*patch 32.* but the model's is "
                           r"ViT-B/16 .*patch 16.*variant 'clip_vit_b32'"):
    pretrained.load_model(abstract, state, source='open_clip', towers={'image': 'image'})


def test_missing_unexpected_and_misshapen_keys_are_listed():
  images, tokens = inputs()
  _, abstract, _ = init(clip_model(), images, tokens)
  sd = clip_state()
  del sd['visual.transformer.resblocks.1.mlp.c_fc.bias']
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r'missing keys \(1\):\n    visual.transformer.resblocks.1.mlp.c_fc'):
    pretrained.load_model(abstract, sd)
  sd = clip_state()
  sd['visual.transformer.resblocks.0.ls_1.gamma'] = np.ones(W, np.float32)
  sd['bogus'] = np.ones(1, np.float32)
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r'unexpected keys \(2\):\n    bogus\n    visual.transformer'):
    pretrained.load_model(abstract, sd)
  sd = clip_state()
  sd['visual.ln_pre.weight'] = np.ones(W + 1, np.float32)
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r'tower/pre_norm/scale: checkpoint \(17,\), model \(16,\)'):
    pretrained.load_model(abstract, sd)
  # A model without CLIP's ln_pre: the checkpoint's pre-norm has no place.
  c = clip_model()
  c.model.encoders.image.pre_norm = False
  _, abstract, _ = init(c, images, tokens)
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r'checkpoint params the model does not have \(2\):\n'
                           r'    tower/pre_norm/bias'):
    pretrained.load_model(abstract, clip_state())


def test_trainer_init_from_replaces_params_and_resets_the_optimizer(tmp_path):
  """What the trainer does on a fresh run with `config.init_from.path` (on a resumed one
  it restores its own checkpoint instead: `trainer._train`)."""
  import optax
  from mmjax.train import mesh as mesh_lib, sharding as sharding_lib, step as step_lib
  c = clip_model()
  images, tokens = inputs()
  _, abstract, _ = init(c, images, tokens)
  start, _ = pretrained.load_model(abstract, clip_state(seed=5))
  c.init_from.path = str(tmp_path / 'start.safetensors')
  pretrained.export_open_clip(start, c.init_from.path)
  mesh = mesh_lib.make_mesh(None, jax.devices()[:2])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx = optax.adam(1e-3)
  fresh, _ = pretrained.load_model(abstract, clip_state(seed=6))   # "the initialisation"
  state = step_lib.TrainState.create(apply_fn=None, tx=tx,
                                     params=jax.device_put(fresh, replicated))
  lines = []
  specs = sharding_lib.replicated_specs(state.params)
  init_from = functools.partial(trainer._init_from, specs=specs)  # pylint: disable=protected-access
  state = init_from(state, c.init_from, tx, mesh, report=lines.append)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), start)
  assert all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(state.opt_state[0].mu))
  assert jax.tree.leaves(state.params)[0].sharding.is_fully_replicated
  assert 'towers_image: ' in lines[0]
  c.init_from.format = 'timm'
  with pytest.raises(ValueError, match="init_from: .*no timm ViT"):
    init_from(state, c.init_from, tx, mesh, report=lines.append)
