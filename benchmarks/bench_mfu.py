"""Training throughput and model FLOPs utilisation (MFU) of the CLIP ViT-B/16 + text-B
train step in bfloat16.

The step is the trainer's (`mmjax.train.step.make_train_step`: shard_map over a 1-D data
mesh of every local device, the CLIP objective with negatives gathered from all devices,
AdamW), the towers computing in bfloat16 (the encoders' `dtype` field; params and
optimizer state stay float32). One fixed batch of random images and token ids is fed
to every step, so data loading is not timed.

FLOPs are counted analytically (`forward_flops`): every matmul of both towers' forward
pass as 2 m n k (patch embedding, QKV and output projections, attention scores Q K^T
and the weighted sum A V, the MLPs, the projections into the embedding, the image-text
logits), and a training step as 3x the forward (the backward pass costs two matmuls per
forward matmul: the usual convention; recomputation under `--remat` is not counted, as
MFU does not count it). Elementwise work (LayerNorm, activations, softmax, the
optimizer) is not counted. The text tower's causal mask is counted as full attention:
the step computes every score and masks them. The token embedding lookup counts 0.
The count is checked against XLA's own (`compiled.cost_analysis()`, per device: the
compiled program is one device's share of the SPMD step), which also counts the
elementwise work, so the analytic figure should come out a little below it.

MFU = achieved model TFLOP/s per device / the device's peak dense bfloat16 TFLOP/s,
the peak from `PEAKS` (by `jax.devices()[0].device_kind`) or `--peak_tflops`.

    python benchmarks/bench_mfu.py [--per_device_batch N] [--steps N] [--peak_tflops T]
        [--remat] [--json out.json]
"""
import argparse
import json
import re
import time

import jax
import jax.numpy as jnp

from bench_common import b16_batch, b16_config, note_load
from mmjax import experiment
from mmjax.models import model as model_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives
from mmjax.train import optimizer as opt_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib

MiB = 2 ** 20

# Dense (no 2:4 sparsity) bfloat16 peak TFLOP/s per chip, matched in order against
# `device_kind`. Sources: NVIDIA's H100 and H200 datasheets (BF16 Tensor Core 1,979
# TFLOPS for SXM, 1,513 for H100 PCIe, both quoted with sparsity: half of it dense),
# NVIDIA's A100 datasheet (312 dense, 624 with sparsity), Google Cloud's TPU pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p: peak bf16 compute per chip). JAX names a
# v5e 'TPU v5 lite' and a v5p 'TPU v5'. Other parts (H100/H200 NVL, newer TPUs) are not
# in the table: pass --peak_tflops.
PEAKS = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100(?!.*NVL)", "H100 SXM", 989.0),
    (r"H200(?!.*NVL)", "H200 SXM", 989.0),   # the H100 SXM's compute, more memory
    (r"A100", "A100", 312.0),
    (r"TPU v4", "TPU v4", 275.0),
    (r"TPU v5 ?(lite|e)", "TPU v5e", 197.0),
    (r"TPU v5p?$", "TPU v5p", 459.0),
)


def peak_tflops(device_kind, override=None):
  """(peak dense bf16 TFLOP/s or None, where it came from)."""
  if override:
    return float(override), "--peak_tflops"
  for pattern, chip, tflops in PEAKS:
    if re.search(pattern, device_kind):
      return tflops, f"table ({chip})"
  return None, f"no peak known for {device_kind}"


def _block_flops(n, tokens, width, mlp_dim, depth):
  """Forward matmul FLOPs of `depth` pre-LN blocks on n x tokens x width."""
  rows = n * tokens
  return {"qkv_out": depth * 4 * 2 * rows * width * width,
          "attention": depth * 2 * 2 * n * tokens * tokens * width,   # QK^T and AV
          "mlp": depth * 2 * 2 * rows * width * mlp_dim}


def _head_flops(kind, n, width, embed_dim):
  if kind == "linear":
    return 2 * n * width * embed_dim
  if kind == "mlp":
    return 2 * n * width * width + 2 * n * width * embed_dim
  return 0   # identity


def vit_flops(fields, n, image_size, embed_dim, head="linear"):
  """Forward matmul FLOPs of a patch-stem ViT image tower and its projection head on n
  images of image_size^2 px, by term; `fields` are the encoder's module fields."""
  if fields["stem"] != "patch" or fields["pool"] == "map":
    raise ValueError(f"vit_flops counts the patch stem with cls/gap pooling; got stem="
                     f"{fields['stem']!r}, pool={fields['pool']!r}")
  p, width = fields["patch_size"], fields["width"]
  patches = (image_size // p) ** 2
  tokens = patches + (fields["pool"] == "cls")
  terms = {"embed": 2 * n * patches * (p * p * fields["channels"]) * width}
  terms.update(_block_flops(n, tokens, width, fields["mlp_dim"] or 4 * width,
                            fields["depth"]))
  terms["head"] = _head_flops(head, n, width, embed_dim)
  return terms


def text_flops(fields, n, length, embed_dim, head="linear"):
  """Forward matmul FLOPs of a text tower on n sequences of `length` tokens (causal
  attention counted as full) and its projection head, by term."""
  width = fields["width"]
  terms = {"embed": 0}   # a lookup
  terms.update(_block_flops(n, length, width, fields["mlp_dim"] or 4 * width,
                            fields["depth"]))
  out = width
  terms["head"] = 0
  if fields.get("proj_dim"):
    terms["head"] += 2 * n * width * fields["proj_dim"]
    out = fields["proj_dim"]
  terms["head"] += _head_flops(head, n, out, embed_dim)
  return terms


def forward_flops(model_config, global_batch, image_size):
  """{'image': terms, 'text': terms, 'logits': FLOPs} of one forward pass over the
  global batch. The text length is the tower's `max_len` (CLIP: 77). Logits: the CLIP
  loss computes both directions, each device its rows against the global batch:
  2 x 2 B B E in all."""
  image = model_lib.encoder_fields(model_config.encoders.image)
  text = model_lib.encoder_fields(model_config.encoders.text)
  e = model_config.embed_dim
  return {"image": vit_flops(image, global_batch, image_size, e, model_config.head),
          "text": text_flops(text, global_batch, text["max_len"], e, model_config.head),
          "logits": 2 * 2 * global_batch * global_batch * e}


def total(flops):
  """The sum of a `forward_flops` result (or any nest of dicts of numbers)."""
  return sum(total(v) if isinstance(v, dict) else v for v in flops.values())


def train_flops_per_device(flops, num_devices):
  """3x the forward, split evenly over the devices."""
  return 3 * total(flops) / num_devices


def xla_flops(compiled):
  """'flops' of `compiled.cost_analysis()` (a dict, or in some JAX versions a list of
  one dict per program: an SPMD step is one program, one device's share)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def build_step(config, mesh, per_device_batch, image_size):
  """(compiled step, state, batch, key): the trainer's jitted step lowered for a
  replicated state and a batch split over the mesh, and the arrays to feed it."""
  model = experiment.build_model(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              max_logit_scale=config.model.max_logit_scale)
  text_len = model_lib.encoder_fields(config.model.encoders.text)["max_len"]
  global_batch = per_device_batch * mesh.size
  shapes = b16_batch(global_batch, image_size, text_len)
  sample = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        b16_batch(1, image_size, text_len))
  specs = sharding_lib.specs_from_config(step_lib.abstract_params(model, sample), mesh,
                                         config.sharding)
  init_rng, data_rng, key = jax.random.split(jax.random.key(config.seed), 3)
  state = step_lib.create_train_state(model, tx, sample, init_rng, mesh, specs)
  vocab = model_lib.encoder_fields(config.model.encoders.text)["vocab_size"]

  @jax.jit
  def make_batch(rng):
    a, b = jax.random.split(rng)
    return {"image": jax.random.normal(a, shapes["image"].shape, jnp.float32),
            "text": jax.random.randint(b, shapes["text"].shape, 0, vocab, jnp.int32),
            "mask": {m: jnp.ones((global_batch,), bool) for m in ("image", "text")}}

  batch = jax.device_put(make_batch(data_rng), mesh_lib.batch_sharding(mesh))
  train_step = step_lib.make_train_step(
      model, objectives.build(config.objective, config.model), config.objective, mesh,
      deterministic_reductions=config.deterministic_reductions, specs=specs)
  compiled = train_step.lower(state, batch, key).compile()
  return compiled, state, batch, key


def run(per_device_batch, steps, image_size=224, peak=None, remat=False):
  """The figures of one measurement (a dict)."""
  fields = {"dtype": "bfloat16"}
  if remat:
    fields["remat"] = True
  config = b16_config(**fields)
  mesh = mesh_lib.make_mesh()   # every local device on 'data'
  n = mesh.size
  config.batch_size = per_device_batch * n
  device = jax.devices()[0]
  started = time.time()
  compiled, state, batch, key = build_step(config, mesh, per_device_batch, image_size)
  compile_s = time.time() - started
  flops = forward_flops(config.model, config.batch_size, image_size)
  analytic = train_flops_per_device(flops, n)
  xla = xla_flops(compiled)
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  state, metrics = compiled(state, batch, key)   # warm-up: two steps
  first_loss = float(metrics["loss"])
  state, metrics = compiled(state, batch, key)
  jax.block_until_ready(state)
  load = note_load(f"timing {steps} steps")
  started = time.time()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready((state, metrics))
  elapsed = time.time() - started
  steps_per_s = steps / elapsed
  achieved = analytic * steps_per_s / 1e12
  peak_value, peak_source = peak_tflops(device.device_kind, peak)
  terms = {f"{m}/{k}": v for m in ("image", "text") for k, v in flops[m].items()}
  terms["logits"] = flops["logits"]
  return {
      "model": "CLIP ViT-B/16 + text-B, embed 512, bfloat16 compute, AdamW",
      "platform": device.platform, "device_kind": device.device_kind, "devices": n,
      "per_device_batch": per_device_batch, "global_batch": config.batch_size,
      "image_size": image_size,
      "text_len": model_lib.encoder_fields(config.model.encoders.text)["max_len"],
      "remat": remat, "steps": steps, "load_1min": load,
      "build_compile_s": round(compile_s, 1), "step_s": elapsed / steps,
      "steps_per_s": steps_per_s, "examples_per_s": steps_per_s * config.batch_size,
      "analytic_tflop_per_step_per_device": analytic / 1e12,
      "xla_tflop_per_step_per_device": xla / 1e12, "analytic_over_xla": analytic / xla,
      "achieved_tflops_per_device": achieved,
      "xla_tflops_per_device": xla * steps_per_s / 1e12,
      "peak_tflops": peak_value, "peak_source": peak_source,
      "mfu": achieved / peak_value if peak_value else None,
      "temp_mib_per_device": temp / MiB if temp is not None else None,
      "first_loss": first_loss, "final_loss": float(metrics["loss"]),
      "forward_gflop_terms_global": {k: v / 1e9 for k, v in terms.items()},
  }


def report(r):
  """The figures as a short table."""
  mfu = (f"{100 * r['mfu']:.1f}% (peak {r['peak_tflops']:g} TFLOP/s, {r['peak_source']})"
         if r["mfu"] is not None else f"n/a ({r['peak_source']})")
  temp = "n/a" if r["temp_mib_per_device"] is None else f"{r['temp_mib_per_device']:.0f} MiB"
  rows = [
      ("device", f"{r['devices']} x {r['device_kind']} ({r['platform']})"),
      ("batch", f"{r['per_device_batch']} per device, {r['global_batch']} global, "
                f"{r['image_size']} px, text {r['text_len']} tokens"),
      ("build + compile", f"{r['build_compile_s']:.1f} s"),
      ("steps/s", f"{r['steps_per_s']:.3f} ({1000 * r['step_s']:.0f} ms a step, "
                  f"{r['steps']} steps, load {r['load_1min']})"),
      ("examples/s", f"{r['examples_per_s']:.1f}"),
      ("model TFLOP a step per device", f"{r['analytic_tflop_per_step_per_device']:.4f} "
                                        "(analytic, 3x forward)"),
      ("XLA TFLOP a step per device", f"{r['xla_tflop_per_step_per_device']:.4f} "
                                      f"(analytic / XLA = {r['analytic_over_xla']:.3f})"),
      ("achieved TFLOP/s per device", f"{r['achieved_tflops_per_device']:.3f} (model), "
                                      f"{r['xla_tflops_per_device']:.3f} (XLA's count)"),
      ("MFU", mfu),
      ("step temp memory per device", temp),
      ("loss", f"{r['first_loss']:.4f} at the first step, {r['final_loss']:.4f} after "
               "the timed ones (the same batch every step)"),
  ]
  width = max(len(k) for k, _ in rows)
  print(f"\n{r['model']}\n")
  for k, v in rows:
    print(f"  {k:<{width}}  {v}")
  if r["platform"] == "gpu":
    print("\n  (on GPUs attention runs through jax.nn.dot_product_attention; where that "
          "is cuDNN's fused kernel, XLA's cost analysis may not count its FLOPs)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--per_device_batch", type=int, default=None,
                      help="default: 256 on GPU/TPU, 2 on CPU")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 "
                      "on GPU/TPU, 3 on CPU)")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak dense bf16 TFLOP/s (overrides the table)")
  parser.add_argument("--remat", action="store_true", help="recompute each block's "
                      "activations in the backward pass (to fit a bigger batch)")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args()
  cpu = jax.devices()[0].platform == "cpu"
  batch = args.per_device_batch or (2 if cpu else 256)
  steps = args.steps or (3 if cpu else 20)
  r = run(batch, steps, args.image_size, args.peak_tflops, args.remat)
  report(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=1)


if __name__ == "__main__":
  main()
