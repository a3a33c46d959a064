"""Freezing and LoRA: what they cost and that they do what they say.

1. Counts (shapes only, `jax.eval_shape`; nothing of the big model runs): ViT-B/16 on
   224x224 images + CLIP's B text tower (embed 512), full fine-tuning against LoRA at
   rank 8: parameters that train, and the AdamW state in bytes
   (`mmjax.train.optimizer.make_optimizer`), for two target sets.
2. Merged vs unmerged: the real B/16 + text-B forward on a batch of 2 on CPU, with
   adapters of trained size (B ~ N(0, 0.02^2) instead of 0): the merged params through
   the plain model against x W + s (x A) B beside every adapted kernel
   (`LoraModel.apply_unmerged`); the largest difference of the embeddings and features,
   relative to their largest magnitude.
3. 50 training steps through the trainer on `configs/default.py:runlocal` (retrieval
   evaluation only), once with LiT's rules (image tower and head frozen) and once with
   LoRA at rank 8: the final checkpoint's params against the initial ones, and the
   optimizer state's bytes against full fine-tuning's.

    python benchmarks/bench_lora.py [--rank 8] [--steps 50] [--skip_forward]
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config_lib, experiment
from mmjax.data import pipeline
from mmjax.models import lora as lora_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib
from mmjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIT_RULES = (("towers_image", "frozen"), ("heads_image", "frozen"))
TARGET_SETS = {"attention + MLP": lora_lib.KERNELS,
               "attention q, v": ("attn/query", "attn/value")}


def big_config(rank=0, targets=lora_lib.KERNELS):
  c = config_lib.base_config()
  c.model.embed_dim = 512
  c.model.encoders.image = config_lib.encoder("vit", "B/16")
  c.model.encoders.text = config_lib.encoder("text", "B", eos_id=49407)
  c.model.lora = config_lib.lora_config(rank=rank, alpha=2 * rank if rank else 0,
                                        targets=targets)
  return c


def big_batch(size=2, concrete=False):
  if not concrete:
    return {"image": jax.ShapeDtypeStruct((size, 224, 224, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((size, 77), jnp.int32),
            "mask": {m: jax.ShapeDtypeStruct((size,), jnp.bool_) for m in ("image", "text")}}
  rng = np.random.default_rng(0)
  text = rng.integers(3, 49406, size=(size, 77)).astype(np.int32)
  text[:, 0] = 49406
  text[:, 20] = 49407
  return {"image": rng.uniform(size=(size, 224, 224, 3)).astype(np.float32),
          "text": text, "mask": {m: np.ones(size, bool) for m in ("image", "text")}}


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def counts(rank):
  """Rows of (setting, trainable params, total params, optimizer-state bytes)."""
  rows = []
  settings = [("full fine-tuning", big_config())] + [
      (f"LoRA r={rank}, {name}", big_config(rank, targets))
      for name, targets in TARGET_SETS.items()]
  for name, config in settings:
    model = experiment.build_model(config)
    params = jax.eval_shape(
        lambda r, batch, m=model: m.init({"params": r, "dropout": r}, batch),
        jax.random.key(0), big_batch())["params"]
    adapters = experiment.adapters_key(config)
    tx = opt_lib.make_optimizer(config.optimizer, config.total_steps, adapters=adapters)
    state = jax.eval_shape(tx.init, params)
    trainable = (lora_lib.count(params[adapters]) if adapters else lora_lib.count(params))
    rows.append((name, trainable, lora_lib.count(params), nbytes(state)))
  return rows


def merged_vs_unmerged(rank):
  config = big_config(rank)
  model = experiment.build_model(config)
  batch = big_batch(concrete=True)
  started = time.time()
  params = jax.jit(lambda r: model.init({"params": r, "dropout": r}, batch))(
      jax.random.key(0))["params"]
  base, adapters = lora_lib.split(params)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapters = treedef.unflatten([
      x if x.shape[-2] != rank else 0.02 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys)])     # the B matrices ([r, out]) get trained sizes
  params = {**base, lora_lib.ADAPTERS: adapters}
  plain = jax.jit(lambda p, b: model.model.apply({"params": p}, b))
  merged = plain(model.merge(params), batch)
  unmerged = jax.jit(lambda p, b: model.apply_unmerged({"params": p}, b))(params, batch)
  without = plain(base, batch)
  out = {}
  for kind in ("embeddings", "features"):
    for m in ("image", "text"):
      a = np.asarray(getattr(merged, kind)[m], np.float64)
      b = np.asarray(getattr(unmerged, kind)[m], np.float64)
      c = np.asarray(getattr(without, kind)[m], np.float64)
      scale = np.abs(b).max()
      out[f"{kind}/{m}"] = (np.abs(a - b).max() / scale, np.abs(b - c).max() / scale)
  return out, time.time() - started


def small_config(steps, rules=(), rank=0):
  c = config_lib.load_config(os.path.join(REPO, "configs", "default.py"), "runlocal")
  c.total_steps = steps
  c.checkpoint_every_steps = steps
  c.eval_every_steps = steps
  for name in [n for n in c.evals if n != "retrieval"]:
    del c.evals[name]
  c.optimizer.rules = rules
  c.model.lora = config_lib.lora_config(rank=rank, alpha=2 * rank if rank else 0)
  return c


def short_run(config):
  """Trains `config` in a fresh workdir; the initial and final train states."""
  with tempfile.TemporaryDirectory() as workdir:
    started = time.time()
    metrics = trainer.train_and_evaluate(config, workdir)
    seconds = time.time() - started
    mesh = mesh_lib.make_mesh(config.mesh)
    model = experiment.build_model(config)
    tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                                max_logit_scale=config.model.max_logit_scale,
                                adapters=experiment.adapters_key(config))
    featurize = experiment.make_featurize(config)
    sample = experiment.sample_batch(pipeline.make_source(config.data, "train"), featurize)
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    initial = step_lib.create_train_state(model, tx, sample, init_rng, mesh)
    manager = ckpt_lib.make_manager(workdir, read_only=True)
    try:
      final = ckpt_lib.restore(manager, config.total_steps, step_lib.abstract_state(initial))
    finally:
      manager.close()
  frozen = opt_lib.frozen_mask(config.optimizer, initial.params,
                               adapters=experiment.adapters_key(config))
  return initial, final, frozen, metrics, seconds


def compare(initial, final, frozen):
  """(frozen leaves, frozen params, frozen leaves bit-identical, trained leaves,
  trained leaves changed)."""
  flags = jax.tree.leaves(frozen)
  before = jax.tree.leaves(jax.device_get(initial.params))
  after = jax.tree.leaves(jax.device_get(final.params))
  same = [np.array_equal(a, b) and a.tobytes() == b.tobytes() for a, b in zip(before, after)]
  n_frozen = sum(flags)
  return (n_frozen, sum(a.size for a, f in zip(before, flags) if f),
          sum(s for s, f in zip(same, flags) if f),
          len(flags) - n_frozen, sum(not s for s, f in zip(same, flags) if not f))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--skip_forward", action="store_true")
  args = parser.parse_args()

  print("## Counts: ViT-B/16 (224x224) + text-B, embed 512 (shapes only)\n")
  print("| setting | trainable params | of all params | AdamW state |")
  print("|---|---|---|---|")
  rows = counts(args.rank)
  full_state = rows[0][3]
  for name, trainable, total, state in rows:
    print(f"| {name} | {trainable:,} ({100 * trainable / total:.2f}%) | {total:,} | "
          f"{state / 2**20:,.1f} MiB ({100 * state / full_state:.2f}%) |")

  if not args.skip_forward:
    diffs, seconds = merged_vs_unmerged(args.rank)
    print(f"\n## Merged vs unmerged, B/16 + text-B forward, batch 2, LoRA r={args.rank} "
          f"on attention + MLP ({seconds:.0f} s)\n")
    print("| output | max abs(merged - unmerged) / max abs(unmerged) | the adapters' "
          "change: max abs(unmerged - base) / max abs(unmerged) |")
    print("|---|---|---|")
    for key, (diff, change) in diffs.items():
      print(f"| {key} | {diff:.2e} | {change:.2e} |")

  print(f"\n## {args.steps} training steps, configs/default.py:runlocal\n")
  print("| run | frozen leaves (params) | bit-identical after the run | trained leaves "
        "changed | AdamW state | vs full fine-tuning | final loss | wall |")
  print("|---|---|---|---|---|---|---|---|")
  runs = [("full fine-tuning", small_config(args.steps)),
          ("LiT rules", small_config(args.steps, rules=LIT_RULES)),
          (f"LoRA r={args.rank}", small_config(args.steps, rank=args.rank))]
  full_bytes = None
  for name, config in runs:
    initial, final, frozen, metrics, seconds = short_run(config)
    state_bytes = nbytes(final.opt_state)
    full_bytes = full_bytes or state_bytes
    if frozen is None:
      frozen = jax.tree.map(lambda _: False, initial.params)
    n_frozen, frozen_params, identical, n_trained, changed = compare(initial, final, frozen)
    # Every byte of the state belongs to a trained param: 2 moments of each, plus counts.
    moments = 2 * sum(x.nbytes for x, f in zip(jax.tree.leaves(jax.device_get(final.params)),
                                                jax.tree.leaves(frozen)) if not f)
    print(f"| {name} | {n_frozen} ({frozen_params:,}) | {identical} of {n_frozen} | "
          f"{changed} of {n_trained} | {state_bytes:,} B (moments of trained params: "
          f"{moments:,} B; frozen: {state_bytes - moments - _counters(final.opt_state)} B) "
          f"| {100 * state_bytes / full_bytes:.1f}% | {metrics['train/loss']:.3f} | "
          f"{seconds:.0f} s |")


def _counters(opt_state) -> int:
  """Bytes of the state's scalar counters (AdamW's and the schedule's step counts)."""
  return sum(x.nbytes for x in jax.tree.leaves(jax.device_get(opt_state)) if x.ndim == 0
             and np.issubdtype(x.dtype, np.integer))


if __name__ == "__main__":
  main()
