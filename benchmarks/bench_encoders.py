"""Forward+backward throughput of ViT-S/16 and the CLIP-B text tower vs PyTorch.

References, in PyTorch (CPU build), measured by this same script:

- timm's `vit_small_patch16_224` (num_classes=0: class-token pooling after
  the final LayerNorm, no classifier) against `build_encoder('vit', 'S/16')`;
- open_clip's `TextTransformer` with CLIP ViT-B's text tower (width 512,
  12 layers, 8 heads, vocabulary 49,408, 77 positions, causal, pooled at
  eos, no projection) against `build_encoder('text', 'B', eos_id=49407)`.

Both references use the tanh GELU and the LayerNorm epsilon (1e-6) that
mmjax's blocks use. The script copies the PyTorch weights into the mmjax
modules and checks that the two sides' features agree before timing
anything, so both compute the same function. It times one training-style step: float32, dropout off, the gradient of
mean(features ** 2) w.r.t. every parameter, interleaving the two sides.

timm and open_clip import torchvision. The torchvision wheel published for
torch 2.13 is a CUDA build whose compiled ops cannot load against the CPU
torch; neither model uses those ops, but torchvision's import registers
fake kernels for two of them, so when its compiled library does not load,
the script declares those two op schemas first and the Python part imports.

    pip install --no-deps torchvision==0.28.0 timm open_clip_torch ftfy \
        regex wcwidth      # with the CPU torch 2.13.0; benchmark only
    python benchmarks/bench_encoders.py [--batch 8] [--rounds 5]
"""
import argparse
import functools
import glob
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mmjax.models.registry import build_encoder

BOS_ID, EOS_ID = 49406, 49407  # CLIP's BPE start/end of text

# Declared torchvision op schemas, kept alive: they live as long as this.
_TORCHVISION_SCHEMAS = None


def import_references():
  """Imports timm and open_clip; returns (timm, open_clip.transformer)."""
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    raise SystemExit('this benchmark needs torchvision, timm and open_clip; '
                     'see the module docstring')
  compiled = glob.glob(os.path.join(os.path.dirname(spec.origin), '_C*.so'))
  try:
    torch.ops.load_library(compiled[0])
  except (IndexError, OSError):
    # Only the schemas are needed for torchvision's fake-kernel
    # registrations; calling these ops would fail, and nothing here does.
    global _TORCHVISION_SCHEMAS  # pylint: disable=global-statement
    _TORCHVISION_SCHEMAS = torch.library.Library('torchvision', 'DEF')
    for op in ('nms', 'qnms'):
      _TORCHVISION_SCHEMAS.define(
          f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import timm  # pylint: disable=g-import-not-at-top
  from open_clip import transformer as open_clip_transformer  # pylint: disable=g-import-not-at-top
  return timm, open_clip_transformer


def _np(tensor):
  return tensor.detach().numpy().astype(np.float32)


def _block_params(weights, prefix, names, num_heads):
  """One mmjax `EncoderBlock` from a PyTorch pre-LN block's weights.

  Args:
    weights: the model's state dict as NumPy arrays.
    prefix: the block's prefix in it, e.g. 'blocks.3.'.
    names: the block's own names of (ln1, fused qkv weight, fused qkv bias,
      attention output projection, ln2, mlp fc1, mlp fc2).
    num_heads: attention heads.
  """
  ln1, qkv_w, qkv_b, proj, ln2, fc1, fc2 = (prefix + n for n in names)
  width = weights[ln1 + '.weight'].shape[0]
  head_dim = width // num_heads
  attn = {}
  for i, name in enumerate(('query', 'key', 'value')):
    rows = slice(i * width, (i + 1) * width)
    # PyTorch computes x @ W.T with output index head * head_dim + d.
    attn[name] = {
        'kernel': weights[qkv_w][rows].T.reshape(width, num_heads, head_dim),
        'bias': weights[qkv_b][rows].reshape(num_heads, head_dim)}
  attn['out'] = {
      'kernel': weights[proj + '.weight'].T.reshape(num_heads, head_dim,
                                                     width),
      'bias': weights[proj + '.bias']}

  def dense(name):
    return {'kernel': weights[name + '.weight'].T,
            'bias': weights[name + '.bias']}

  def norm(name):
    return {'scale': weights[name + '.weight'], 'bias': weights[name + '.bias']}

  return {'ln_attn': norm(ln1), 'attn': attn, 'ln_mlp': norm(ln2),
          'mlp': {'fc1': dense(fc1), 'fc2': dense(fc2)}}


def vit_variables_from_timm(model, depth, num_heads):
  """mmjax ViT variables (class-token pooling) holding a timm ViT's weights."""
  w = {k: _np(v) for k, v in model.state_dict().items()}
  names = ('norm1', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj', 'norm2',
           'mlp.fc1', 'mlp.fc2')
  encoder = {f'block_{i}': _block_params(w, f'blocks.{i}.', names, num_heads)
             for i in range(depth)}
  encoder['encoder_norm'] = {'scale': w['norm.weight'], 'bias': w['norm.bias']}
  params = {
      'embedding': {'kernel': w['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                    'bias': w['patch_embed.proj.bias']},
      'cls': w['cls_token'], 'pos_embedding': w['pos_embed'],
      'encoder': encoder}
  return {'params': params}


def text_variables_from_open_clip(model, depth, num_heads):
  """mmjax text-tower variables holding an open_clip TextTransformer's."""
  w = {k: _np(v) for k, v in model.state_dict().items()}
  names = ('ln_1', 'attn.in_proj_weight', 'attn.in_proj_bias',
           'attn.out_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj')
  encoder = {
      f'block_{i}': _block_params(w, f'transformer.resblocks.{i}.', names,
                                  num_heads)
      for i in range(depth)}
  encoder['encoder_norm'] = {'scale': w['ln_final.weight'],
                             'bias': w['ln_final.bias']}
  params = {'token_embedding': {'embedding': w['token_embedding.weight']},
            'pos_embedding': w['positional_embedding'], 'encoder': encoder}
  return {'params': params}


def check_same_function(name, module, variables, jax_inputs, torch_model,
                        torch_inputs):
  """Exits unless the mmjax module with `variables` matches the reference.

  Returns:
    (parameter count, largest |difference| / largest |feature|).
  """
  expected = jax.eval_shape(module.init, jax.random.key(0), jax_inputs)
  shapes = jax.tree.map(lambda a: a.shape, variables)
  if shapes != jax.tree.map(lambda a: a.shape, expected):
    raise SystemExit(f'{name}: converted weights do not have the layout of '
                     f'the mmjax module')
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  torch_count = sum(p.numel() for p in torch_model.parameters())
  if count != torch_count:
    raise SystemExit(f'{name}: parameter counts differ: mmjax {count}, '
                     f'reference {torch_count}')
  ours = np.asarray(jax.jit(module.apply)(variables, jax_inputs))
  with torch.no_grad():
    theirs = torch_model.eval()(torch_inputs).numpy()
  error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  if error > 1e-4:
    raise SystemExit(f'{name}: features differ from the reference '
                     f'(relative error {error:.2e})')
  return count, error


def jax_step(module, variables, inputs):
  """(step() running one jitted fwd+bwd, first-call seconds)."""
  grad_fn = jax.jit(
      jax.grad(lambda v, x: jnp.mean(module.apply(v, x) ** 2)))
  start = time.perf_counter()
  jax.block_until_ready(grad_fn(variables, inputs))
  first = time.perf_counter() - start
  return lambda: jax.block_until_ready(grad_fn(variables, inputs)), first


def torch_step(model, inputs):
  """step() running one PyTorch fwd+bwd (train mode; dropout is 0)."""
  model.train()

  def step():
    model.zero_grad(set_to_none=True)
    (model(inputs) ** 2).mean().backward()

  step()
  return step


def interleaved_seconds(step_a, step_b, rounds):
  """Times a and b alternately; returns (best_a, best_b, median_a, median_b).

  The machine is shared, so steps are interleaved (both sides see the same
  background load) and the best step is the figure of merit.
  """
  step_a()
  step_b()  # one more warm step each
  times_a, times_b = [], []
  for _ in range(rounds):
    for step, times in ((step_a, times_a), (step_b, times_b)):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
  return (min(times_a), min(times_b), float(np.median(times_a)),
          float(np.median(times_b)))


def clip_tokens(rng, batch, length):
  """bos, random BPE ids, eos, then padding 0; lengths vary per row."""
  tokens = np.zeros((batch, length), np.int64)
  for i, end in enumerate(rng.integers(10, length - 1, batch)):
    tokens[i, 0] = BOS_ID
    tokens[i, 1:end] = rng.integers(1, BOS_ID, end - 1)
    tokens[i, end] = EOS_ID
  return tokens


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=5,
                      help='timed steps per side, interleaved')
  parser.add_argument('--torch_threads', type=int, default=None,
                      help="PyTorch's intra-op threads (default: its own)")
  args = parser.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  timm, open_clip_transformer = import_references()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  print(f'backend {jax.default_backend()} ({jax.device_count()} device(s)); '
        f'torch {torch.__version__} with {torch.get_num_threads()} threads, '
        f'timm {timm.__version__}; batch {args.batch}; best (median) of '
        f'{args.rounds} interleaved steps after 2 warm ones; load average '
        f'{os.getloadavg()[0]:.1f} at start')

  rows = []
  # ViT-S/16 at 224 px.
  vit = build_encoder('vit', 'S/16')
  t_vit = timm.create_model('vit_small_patch16_224', pretrained=False,
                            num_classes=0, act_layer='gelu_tanh')
  images = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  variables = jax.tree.map(
      jnp.asarray, vit_variables_from_timm(t_vit, vit.depth, vit.num_heads))
  count, error = check_same_function('ViT-S/16', vit, variables,
                                     jnp.asarray(images), t_vit, t_images)
  j_step, j_first = jax_step(vit, variables, jnp.asarray(images))
  t_step = torch_step(t_vit, t_images)
  rows.append(('ViT-S/16 224px', 'timm', count, error, j_first,
               interleaved_seconds(j_step, t_step, args.rounds)))

  # CLIP ViT-B's text tower, 77 tokens.
  text = build_encoder('text', 'B', eos_id=EOS_ID)
  t_text = open_clip_transformer.TextTransformer(
      context_length=text.max_len, vocab_size=text.vocab_size,
      width=text.width, heads=text.num_heads, layers=text.depth,
      output_dim=None, pool_type='eos', eos_id=EOS_ID,
      act_layer=functools.partial(torch.nn.GELU, approximate='tanh'),
      norm_layer=functools.partial(open_clip_transformer.LayerNorm, eps=1e-6))
  tokens = clip_tokens(rng, args.batch, text.max_len)
  t_tokens = torch.from_numpy(tokens)
  variables = jax.tree.map(jnp.asarray, text_variables_from_open_clip(
      t_text, text.depth, text.num_heads))
  j_tokens = jnp.asarray(tokens, jnp.int32)
  count, error = check_same_function('CLIP-B text', text, variables, j_tokens,
                                     t_text, t_tokens)
  j_step, j_first = jax_step(text, variables, j_tokens)
  t_step = torch_step(t_text, t_tokens)
  rows.append(('CLIP-B text 77 tok', 'open_clip', count, error, j_first,
               interleaved_seconds(j_step, t_step, args.rounds)))

  print(f'{"encoder":>18} {"reference":>9} {"params":>11} {"feat err":>8} '
        f'{"mmjax ex/s":>14} {"ref ex/s":>14} {"mmjax/ref":>9} '
        f'{"mmjax 1st step s":>16}')
  for name, ref, count, error, j_first, seconds in rows:
    j_best, t_best, j_med, t_med = seconds
    rate = lambda s: args.batch / s  # noqa: E731
    print(f'{name:>18} {ref:>9} {count:11,d} {error:8.1e} '
          f'{rate(j_best):6.2f} ({rate(j_med):5.2f}) '
          f'{rate(t_best):6.2f} ({rate(t_med):5.2f}) '
          f'{t_best / j_best:9.2f} {j_first:16.1f}')
  print(f'load average {os.getloadavg()[0]:.1f} at end')


if __name__ == '__main__':
  main()
