"""FSDP and gradient caching: memory per device, and that both compute what data
parallelism computes (8 simulated CPU devices).

1. memory: CLIP ViT-B/16 (224 px) + CLIP text-B, embed 512, AdamW. Bytes one device
   holds of the params and the optimizer state, from the arrays' shard shapes
   (`jax.eval_shape` + the shardings of `mmjax.train.sharding`; nothing is
   materialised), replicated (data=8) against fsdp=8 at the default
   `sharding.fsdp_min_size`; beside them the compiled train step's per-device temporary
   memory (`memory_analysis()`) at a global batch of `--b16_batch`.
2. match: `configs/default.py:fsdp` against `configs/default.py`, `--steps` steps of
   the trainer's step on the same data stream and keys: the loss at every step, the
   params at the end.
3. cache: the default experiment's towers at global batch 512 on data=8: the gradient
   with `grad_cache.microbatches=8` against the whole batch (relative error, per array
   and overall), and the compiled gradient step's per-device temporary memory.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/bench_fsdp.py [--parts memory,match,cache] [--steps 20]
"""
import argparse
import os
import time

import jax
import numpy as np

from bench_common import b16_batch, b16_config
from mmjax import config_lib, experiment
from mmjax.data import pipeline
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives
from mmjax.train import optimizer as opt_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def _mesh(**axes):
  return mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict(axes))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def memory(batch_size, compile_step=True):
  """Rows (layout, params MiB/device, opt state MiB/device, total, temp MiB/device)."""
  config = b16_config()
  model = experiment.build_model(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              max_logit_scale=config.model.max_logit_scale)
  sample = b16_batch(1)
  params = step_lib.abstract_params(model, sample)
  shapes = jax.eval_shape(lambda p: step_lib.TrainState.create(
      apply_fn=model.apply, params=p, tx=tx), params)
  rows = []
  for name, axes in (("replicated (data=8)", {"data": 8}),
                     ("fsdp=8", {"data": 1, "fsdp": 8})):
    mesh = _mesh(**axes)
    specs = sharding_lib.specs_from_config(params, mesh, config.sharding)
    shardings = sharding_lib.named(mesh, sharding_lib.state_specs(shapes, specs))
    state = _abstract(shapes, shardings)
    p_bytes = sharding_lib.per_device_bytes(state.params)
    o_bytes = sharding_lib.per_device_bytes(state.opt_state)
    temp = None
    if compile_step:
      train_step = step_lib.make_train_step(model, objectives.get("clip"), config.objective,
                                            mesh, specs=specs)
      batch = _abstract(b16_batch(batch_size),
                        jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh),
                                     b16_batch(batch_size)))
      started = time.time()
      compiled = train_step.lower(state, batch, jax.random.key(0)).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      print(f"  compiled the {name} B/16 step in {time.time() - started:.0f} s", flush=True)
    rows.append((name, p_bytes, o_bytes, temp))
  return rows


def _setup(config, mesh, **chunks):
  experiment.check_config(config, mesh)
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, "train")
  model = experiment.build_model(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              max_logit_scale=config.model.max_logit_scale)
  sample = experiment.sample_batch(source, featurize)
  specs = sharding_lib.specs_from_config(step_lib.abstract_params(model, sample), mesh,
                                         config.sharding)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = step_lib.create_train_state(model, tx, sample, init_rng, mesh, specs)
  data = iter(experiment.train_dataset(config, source, featurize))
  return model, state, specs, data, step_rng


def match(steps):
  """(losses under data=8, losses under fsdp=8, max param difference, temp bytes of
  each compiled step) over `steps` steps of the trainer's step (the same keys, the
  same data stream: what `mmjax.train.trainer` runs)."""
  runs = {}
  for arg in ("", "fsdp"):
    config = config_lib.load_config(os.path.join(REPO, "configs", f"default.py:{arg}"
                                                 if arg else "default.py"))
    mesh = mesh_lib.make_mesh(config.mesh)
    model, state, specs, data, step_rng = _setup(config, mesh)
    train_step = step_lib.make_train_step(
        model, objectives.build(config.objective, config.model), config.objective, mesh,
        deterministic_reductions=config.deterministic_reductions, specs=specs)
    losses, temp = [], None
    for step in range(1, steps + 1):
      batch = pipeline.to_global(next(data), mesh)
      key = jax.random.fold_in(step_rng, step)
      if temp is None:
        temp = train_step.lower(state, batch, key).compile().memory_analysis(
        ).temp_size_in_bytes
      state, metrics = train_step(state, batch, key)
      losses.append(float(metrics["loss"]))
    runs[arg or "data"] = (losses, jax.device_get(state.params), temp,
                           sharding_lib.per_device_bytes((state.params, state.opt_state)))
  diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(runs["data"][1]), jax.tree.leaves(runs["fsdp"][1])))
  return runs, diff


def cache(batch_size=512, k=8):
  """(relative error per array (max), overall, temp bytes with k chunks, without, the
  loss of each)."""
  out = {}
  for chunks in (1, k):
    config = config_lib.load_config(os.path.join(REPO, "configs", "default.py"))
    config.batch_size = batch_size
    config.grad_cache.microbatches = chunks
    mesh = mesh_lib.make_mesh(config.mesh)
    model, state, specs, data, step_rng = _setup(config, mesh)
    grad_fn = jax.jit(step_lib.make_grad_fn(
        model, objectives.build(config.objective, config.model), config.objective, mesh,
        deterministic_reductions=config.deterministic_reductions, specs=specs,
        grad_cache=chunks))
    batch = pipeline.to_global(next(data), mesh)
    key = jax.random.fold_in(step_rng, 1)
    temp = grad_fn.lower(state.params, batch, key, state.step).compile().memory_analysis(
    ).temp_size_in_bytes
    loss, grads, _ = grad_fn(state.params, batch, key, state.step)
    out[chunks] = (float(loss), jax.device_get(grads), temp)
  whole, cached = out[1][1], out[k][1]
  norms = [float(np.linalg.norm(w)) for w in jax.tree.leaves(whole)]
  # Arrays whose exact gradient is zero (attention key biases: softmax ignores a shift
  # shared by all keys) hold rounding noise near 1e-9 in both runs; the per-array
  # error skips arrays whose gradient norm is below 1e-6 of the largest.
  floor = 1e-6 * max(norms)
  per_array = max(float(np.linalg.norm(c - w)) / n for c, w, n in zip(
      jax.tree.leaves(cached), jax.tree.leaves(whole), norms) if n >= floor)
  skipped = sum(n < floor for n in norms)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  overall = float(np.linalg.norm(flat(cached) - flat(whole)) / np.linalg.norm(flat(whole)))
  return per_array, overall, out[k][2], out[1][2], out[1][0], out[k][0], skipped


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="memory,match,cache")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--b16_batch", type=int, default=16, help="global batch of the B/16 "
                      "step whose temporary memory is reported")
  parser.add_argument("--skip_compile", action="store_true",
                      help="B/16: shard shapes only, no compiled step")
  args = parser.parse_args()
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  parts = set(args.parts.split(","))
  if "memory" in parts:
    rows = memory(args.b16_batch, compile_step=not args.skip_compile)
    print(f"\nCLIP ViT-B/16 + text-B, AdamW, per device (8 devices; train step temp at "
          f"global batch {args.b16_batch}):\n")
    print("| layout | params | optimizer state | params + state | step temp |")
    print("|---|---|---|---|---|")
    for name, p, o, temp in rows:
      shown = "-" if temp is None else f"{temp / MiB:.1f} MiB"
      print(f"| {name} | {p / MiB:.1f} MiB | {o / MiB:.1f} MiB | {(p + o) / MiB:.1f} MiB "
            f"| {shown} |")
    ratio = (rows[1][1] + rows[1][2]) / (rows[0][1] + rows[0][2])
    print(f"\nfsdp=8 / replicated, params + state: {ratio:.4f} (1/{1 / ratio:.2f})")
  if "match" in parts:
    runs, diff = match(args.steps)
    data, fsdp = runs["data"], runs["fsdp"]
    gaps = np.abs(np.array(data[0]) - np.array(fsdp[0]))
    print(f"\n{args.steps} steps, configs/default.py:fsdp against configs/default.py:")
    print(f"  losses: step 1 {data[0][0]:.6f}, step {args.steps} {data[0][-1]:.6f} (data) / "
          f"{fsdp[0][-1]:.6f} (fsdp)")
    print(f"  largest loss difference over the steps: {gaps.max():.3g} (at step "
          f"{int(gaps.argmax()) + 1}); largest param difference at the end: {diff:.3g}")
    print(f"  params + optimizer state per device: {data[3] / MiB:.2f} MiB (data) / "
          f"{fsdp[3] / MiB:.2f} MiB (fsdp); step temp {data[2] / MiB:.1f} / "
          f"{fsdp[2] / MiB:.1f} MiB")
  if "cache" in parts:
    per_array, overall, temp_k, temp_1, loss_1, loss_k, skipped = cache()
    print("\nGradCache, default towers, global batch 512 on data=8, microbatches 8 vs 1:")
    print(f"  loss {loss_1:.7f} / {loss_k:.7f}; relative gradient error: {overall:.3g} overall, "
          f"{per_array:.3g} for the worst array ({skipped} arrays with an exactly zero "
          "gradient, the attention key biases, hold only rounding noise and are skipped)")
    print(f"  compiled gradient step temp per device: {temp_1 / MiB:.1f} MiB (whole) / "
          f"{temp_k / MiB:.1f} MiB (8 chunks): {temp_1 / temp_k:.1f}x smaller")


if __name__ == "__main__":
  main()
