"""SigLIP and GRAM rings against all-gather versions on 8 simulated devices.

For each loss, the ring (`siglip_loss`, `gram_loss` with `axis_name`) and the
all-gather reference (`siglip_loss_all_gather`, `gram_loss_all_gather`) are
shard_mapped over an 8-device 'data' mesh at the same global batch. Reported
per device: the compiled temporary buffer size (`memory_analysis()` of the
shard_mapped, jitted function, whose HLO is the per-device program), forward
alone and forward+backward (value and gradient w.r.t. the embeddings), the
wall time of one forward+backward call (8 devices share the host's cores, so
times are only indicative), and the largest difference of values and
gradients between ring and all-gather.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/bench_rings.py [--batch 4096] [--width 256]
"""

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                               ""):
  raise SystemExit(
      "Run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mmjax import align  # noqa: E402


def _siglip(loss):
  def fn(embeddings):
    return loss(embeddings["x"], embeddings["y"], logit_scale=10.0,
                logit_bias=-10.0, axis_name="data")[0]
  return fn


def _gram(loss):
  def fn(embeddings):
    return loss(embeddings, anchor="anchor", logit_scale=10.0,
                label_smoothing=0.1, axis_name="data")[0]
  return fn


def _embeddings(names, batch, width, mesh, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(names) + 1)
  shared = jax.random.normal(keys[-1], (batch, width))
  out = {}
  for name, key in zip(names, keys):
    v = jax.random.normal(key, (batch, width)) + 2.0 * shared
    out[name] = jax.device_put(v / jnp.linalg.norm(v, axis=1, keepdims=True),
                               NamedSharding(mesh, P("data")))
  return out


def _measure(loss, embeddings, mesh):
  sharded = jax.shard_map(loss, mesh=mesh, in_specs=P("data"), out_specs=P())
  forward = jax.jit(sharded).lower(embeddings).compile()
  both = jax.jit(jax.value_and_grad(sharded)).lower(embeddings).compile()
  value, grads = jax.block_until_ready(both(embeddings))  # warm up
  start = time.perf_counter()
  value, grads = jax.block_until_ready(both(embeddings))
  seconds = time.perf_counter() - start
  return {
      "forward": forward.memory_analysis().temp_size_in_bytes,
      "forward+backward": both.memory_analysis().temp_size_in_bytes,
      "seconds": seconds,
      "value": value,
      "grads": grads,
  }


def compare(title, ring_loss, gather_loss, embeddings, mesh):
  ring = _measure(ring_loss, embeddings, mesh)
  gather = _measure(gather_loss, embeddings, mesh)
  mib = 2.0 ** 20
  print(f"\n{title}")
  for key in ("forward", "forward+backward"):
    print(f"  {key:17s} per-device temp memory: ring {ring[key] / mib:8.2f} "
          f"MiB, all-gather {gather[key] / mib:8.2f} MiB, ratio "
          f"{gather[key] / ring[key]:.2f} (target >= 4)")
  print(f"  time of one value+grad call: ring {ring['seconds']:.3f} s, "
        f"all-gather {gather['seconds']:.3f} s")
  grad_error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(ring["grads"]), jax.tree.leaves(gather["grads"])))
  grad_scale = max(float(jnp.max(jnp.abs(a)))
                   for a in jax.tree.leaves(gather["grads"]))
  print(f"  loss ring {float(ring['value']):.6f}, all-gather "
        f"{float(gather['value']):.6f}; max |grad difference| "
        f"{grad_error:.2e} (max |grad| {grad_scale:.2e})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--others", type=int, default=3)
  args = parser.parse_args()
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  n = jax.device_count()
  print(f"{n} devices; global batch {args.batch} ({args.batch // n} per "
        f"device), width {args.width}")

  compare(f"SigLIP, B={args.batch}, D={args.width}",
          _siglip(align.siglip_loss), _siglip(align.siglip_loss_all_gather),
          _embeddings(["x", "y"], args.batch, args.width, mesh), mesh)
  names = ["anchor"] + [f"other{k}" for k in range(args.others)]
  compare(f"GRAM, B={args.batch}, K={args.others}, D={args.width}",
          _gram(align.gram_loss), _gram(align.gram_loss_all_gather),
          _embeddings(names, args.batch, args.width, mesh), mesh)


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
