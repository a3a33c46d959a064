"""Compile time of a ViT against its depth, with and without `scan_layers`.

With `scan_layers=True` the block is one `nn.scan` body, traced and compiled
once, so compile time should stay flat as depth grows; unrolled blocks are
each traced and compiled. The function compiled is a training-style
forward + backward (gradient of a loss of the pooled features w.r.t. all
parameters), lowered and compiled ahead of time with `jit(...).lower().compile()`.

    python benchmarks/bench_compile.py [--depths 4 24] [--variant Ti/16]
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp

from mmjax.models.registry import build_encoder


def compile_seconds(variant, depth, scan_layers, image_size, batch):
  """(trace+lower seconds, XLA compile seconds) of a ViT fwd+bwd."""
  enc = build_encoder('vit', variant, depth=depth, scan_layers=scan_layers)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32)
  params = jax.eval_shape(enc.init, jax.random.key(0), images)

  def loss(variables, x):
    return jnp.mean(enc.apply(variables, x, train=False) ** 2)

  step = jax.jit(jax.grad(loss))
  start = time.perf_counter()
  lowered = step.lower(params, images)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return lowered_at - start, done - lowered_at


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='Ti/16')
  parser.add_argument('--depths', type=int, nargs=2, default=(4, 24))
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=2,
                      help='best of this many compiles per configuration')
  args = parser.parse_args()
  # The first compile in a process pays one-off start-up costs; pay them
  # outside the measurements.
  compile_seconds(args.variant, 1, True, args.image_size, args.batch)
  shallow, deep = args.depths
  print(f'ViT-{args.variant} at {args.image_size}px, batch {args.batch}, '
        f'fwd+bwd; backend {jax.default_backend()}; best of {args.repeats}; '
        f'load average {os.getloadavg()[0]:.1f} at start')
  print(f'{"layout":>9} {"depth":>5} {"trace+lower s":>13} {"compile s":>9} '
        f'{"total s":>8}')
  totals = {}
  for scan in (True, False):
    for depth in (shallow, deep):
      runs = [compile_seconds(args.variant, depth, scan, args.image_size,
                              args.batch) for _ in range(args.repeats)]
      lower_s, compile_s = min(runs, key=sum)
      totals[scan, depth] = lower_s + compile_s
      layout = 'scan' if scan else 'unrolled'
      print(f'{layout:>9} {depth:5d} {lower_s:13.2f} {compile_s:9.2f} '
            f'{lower_s + compile_s:8.2f}')
  for scan in (True, False):
    layout = 'scan' if scan else 'unrolled'
    ratio = totals[scan, deep] / totals[scan, shallow]
    print(f'{layout}: depth {deep} / depth {shallow} total compile time = '
          f'{ratio:.2f}x')
  scan_ratio = totals[True, deep] / totals[True, shallow]
  print(f'load average {os.getloadavg()[0]:.1f} at end')
  print(f'target: scan ratio <= 1.5x -> {"met" if scan_ratio <= 1.5 else "MISSED"}')


if __name__ == '__main__':
  main()
