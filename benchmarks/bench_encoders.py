"""Forward+backward throughput of the ViT-S/16 and CLIP-B text encoders vs PyTorch.

Both sides run the same architecture (pre-LN transformer, tanh-GELU MLP of 4x
width, learned position embeddings; ViT: 16x16 patch convolution and class
token pooling; text: causal attention with a padding mask and eos pooling),
in float32 with dropout off, and time one training-style step: the gradient
of mean(features ** 2) w.r.t. every parameter. The script checks that both
sides have the same parameter count before timing.

The PyTorch side is written here with `torch.nn.TransformerEncoderLayer`
(norm_first=True): timm and open_clip import torchvision, and no torchvision
build matching the pinned CPU torch is installable on the project machines.

    pip install torch==2.13.0   # the pinned CPU wheel; benchmark only
    python benchmarks/bench_encoders.py [--batch 8] [--rounds 5]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from mmjax.models.registry import build_encoder


def gelu_tanh(x):
  return nn.functional.gelu(x, approximate='tanh')


def torch_blocks(width, depth, heads):
  layer = nn.TransformerEncoderLayer(
      width, heads, 4 * width, dropout=0.0, activation=gelu_tanh,
      batch_first=True, norm_first=True)
  return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class TorchViT(nn.Module):
  """ViT with class-token pooling, [B, 3, H, W] -> [B, width]."""

  def __init__(self, width, depth, heads, patch, image_size):
    super().__init__()
    tokens = (image_size // patch) ** 2 + 1
    self.embed = nn.Conv2d(3, width, patch, stride=patch)
    self.cls = nn.Parameter(torch.zeros(1, 1, width))
    self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, width))
    self.blocks = torch_blocks(width, depth, heads)
    self.norm = nn.LayerNorm(width)

  def forward(self, images):
    x = self.embed(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
    return self.norm(self.blocks(x))[:, 0]


class TorchText(nn.Module):
  """CLIP-style text tower, [B, L] ids -> [B, width] at the eos position."""

  def __init__(self, width, depth, heads, vocab, max_len, eos_id):
    super().__init__()
    self.tok = nn.Embedding(vocab, width)
    self.pos = nn.Parameter(0.01 * torch.randn(max_len, width))
    self.blocks = torch_blocks(width, depth, heads)
    self.norm = nn.LayerNorm(width)
    self.eos_id = eos_id

  def forward(self, tokens):
    length = tokens.shape[1]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    x = self.tok(tokens) + self.pos[:length]
    x = self.blocks(x, mask=causal, is_causal=True,
                    src_key_padding_mask=tokens == 0)
    x = self.norm(x)
    eos = (tokens == self.eos_id).int().argmax(dim=1)
    return x[torch.arange(x.shape[0]), eos]


def jax_step(module, inputs):
  """(step() running one jitted fwd+bwd, first-call seconds, param count)."""
  variables = jax.jit(module.init)(jax.random.key(0), inputs)
  grad_fn = jax.jit(
      jax.grad(lambda v, x: jnp.mean(module.apply(v, x) ** 2)))
  start = time.perf_counter()
  jax.block_until_ready(grad_fn(variables, inputs))
  first = time.perf_counter() - start
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  return (lambda: jax.block_until_ready(grad_fn(variables, inputs)), first,
          count)


def torch_step(model, inputs):
  """(step() running one fwd+bwd, param count)."""
  model.train()

  def step():
    model.zero_grad(set_to_none=True)
    (model(inputs) ** 2).mean().backward()

  step()
  return step, sum(p.numel() for p in model.parameters())


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=5,
                      help='timed steps per side, interleaved')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--text_len', type=int, default=77)
  args = parser.parse_args()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  print(f'backend {jax.default_backend()} ({jax.device_count()} device(s)); '
        f'torch {torch.__version__} with {torch.get_num_threads()} threads; '
        f'batch {args.batch}; best (median) of {args.rounds} interleaved '
        f'steps after 2 warm ones')

  rows = []
  # ViT-S/16.
  vit = build_encoder('vit', 'S/16')
  images = rng.standard_normal(
      (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  j_step, j_first, j_count = jax_step(vit, jnp.asarray(images))
  t_model = TorchViT(vit.width, vit.depth, vit.num_heads, vit.patch_size,
                     args.image_size)
  t_step, t_count = torch_step(
      t_model, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  rows.append(('ViT-S/16 images', j_count, t_count, j_first,
               interleaved_seconds(j_step, t_step, args.rounds)))

  # CLIP-B text tower: bos, random ids, eos, padding (lengths vary).
  text = build_encoder('text', 'B', eos_id=49407)
  tokens = np.zeros((args.batch, args.text_len), np.int64)
  for i, length in enumerate(rng.integers(10, args.text_len - 1, args.batch)):
    tokens[i, 0] = 49406
    tokens[i, 1:length] = rng.integers(1, 49406, length - 1)
    tokens[i, length] = 49407
  j_step, j_first, j_count = jax_step(text, jnp.asarray(tokens, jnp.int32))
  t_model = TorchText(text.width, text.depth, text.num_heads, text.vocab_size,
                      text.max_len, 49407)
  t_step, t_count = torch_step(t_model, torch.from_numpy(tokens))
  rows.append(('CLIP-B text', j_count, t_count, j_first,
               interleaved_seconds(j_step, t_step, args.rounds)))

  print(f'{"encoder":>16} {"params":>11} {"jax ex/s":>14} {"torch ex/s":>14} '
        f'{"jax/torch":>9} {"jax 1st step s":>14}')
  for name, j_count, t_count, j_first, seconds in rows:
    if j_count != t_count:
      raise SystemExit(f'{name}: parameter counts differ: jax {j_count}, '
                       f'torch {t_count}')
    j_best, t_best, j_med, t_med = seconds
    rate = lambda s: args.batch / s  # noqa: E731
    print(f'{name:>16} {j_count:11,d} '
          f'{rate(j_best):6.2f} ({rate(j_med):5.2f}) '
          f'{rate(t_best):6.2f} ({rate(t_med):5.2f}) '
          f'{t_best / j_best:9.2f} {j_first:14.1f}')


if __name__ == '__main__':
  main()
