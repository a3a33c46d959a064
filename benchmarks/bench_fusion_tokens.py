"""The figures of benchmarks/README.md, "Fusion under missing modalities" (token-level
fusion, MMP and proxy tokens).

    python benchmarks/bench_fusion_tokens.py --workdir=WORK \\
        [--parts=interaction,redundant,av_digits,cost] [--tfds_dir=DIR] [--runs=a,b] \\
        [--steps=N --batch_size=B --test_size=N]

Parts:

  interaction  the `:interaction` world task (label (colour + size) mod 3, colour in
               image and text, size in audio): every token-level kind (bottleneck,
               cross_attention, joint, ovo_tokens, mmp, proxy) against pooled concat
               and late fusion, trained on complete data; accuracy per combination and
               at test-time missing rates 0 / 0.3 / 0.5 / 0.7
  redundant    `:redundant` trained on 30% MCAR data: MMP (and concat and Flex-MoE
               on the same data), and a dedicated `joint` model per combination for
               image+text and audio+text (trained on that combination only)
  av_digits    av_digits (prepared TFDS data in --tfds_dir): MMP, concat and Flex-MoE
               trained on the same 30% MCAR data
  cost         token-level against pooled fusion at the same encoders (the interaction
               config, batch 128): compiled memory of the gradient step (XLA's memory
               analysis) and its mean step time

Results go to WORK/results.json (updated after every run; `--runs` picks runs of a
part by name). `--steps`, `--batch_size` and `--test_size` set one smaller budget for
every training run of a part (warm-up: a fifth of the steps); by default each config
keeps its own (600 steps of 128). Run it alone on the machine for the timings: the load average is
printed before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench_common import load as load_config, note_load

PARTS = ("interaction", "redundant", "av_digits", "cost")
CONDITIONS = ("audio", "image", "text", "audio+image", "audio+text", "image+text",
              "audio+image+text", "missing_0", "missing_0.3", "missing_0.5",
              "missing_0.7")
AV_CONDITIONS = ("audio+image", "image", "audio", "missing_0", "missing_0.3",
                 "missing_0.5", "missing_0.7")
TOKEN_KINDS = {
    "bottleneck": ("fusion_bottleneck", None),
    "cross_attention": ("fusion_cross_attention", None),
    "joint": ("fusion_joint", None),
    "ovo_tokens": ("fusion_joint", {"kind": "ovo_tokens", "num_heads": 2}),
    "mmp": ("fusion_mmp", None),
    "proxy": ("fusion_joint", {"kind": "proxy", "num_heads": 2, "mask_rate": 0.3,
                               "alignment_weight": 0.2}),
}
POOLED_KINDS = {
    "concat": ("fusion_concat", None),
    "late": ("fusion_concat", {"kind": "late"}),
}


def load(name, arg=None, fusion=None, **fields):
  """configs/<name>.py:<arg>; `fusion` replaces model.fusion (width kept), then
  `fields` are set (`bench_common.load`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = load_config(name, arg)
  if fusion is not None:
    width = config.model.fusion.get("width")
    config.model.fusion = ml_collections.ConfigDict(dict(fusion, width=width))
  config.update_from_flattened_dict(fields)
  return config


def train(config, workdir, conditions):
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  start = time.time()
  metrics = trainer.train_and_evaluate(config, workdir)
  row = {c: metrics.get(f"eval/robustness/{c}/accuracy") for c in conditions}
  row["oracle"] = {c: metrics.get(f"eval/robustness/{c}/ceiling") for c in conditions}
  row["seconds"] = round(time.time() - start, 1)
  return row


def table(rows, conditions):
  print("| method | " + " | ".join(conditions) + " | wall s |")
  for label, row in rows.items():
    cells = ["-" if row.get(c) is None else f"{row[c]:.3f}" for c in conditions]
    print(f"| {label} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")


def _runs(args, part):
  """label -> (config name, arg, fusion override, extra fields)."""
  if part == "interaction":
    return {label: (name, "interaction", fusion, {})
            for label, (name, fusion) in {**POOLED_KINDS, **TOKEN_KINDS}.items()}
  if part == "redundant":
    combination = lambda *ms: {"data.missing": _combination(ms)}  # noqa: E731
    return {
        "mmp": ("fusion_mmp", "redundant,mcar", None, {}),
        "concat_mcar": ("fusion_concat", "redundant,mcar", None, {}),
        "flexmoe": ("fusion_flexmoe", "redundant", None, {}),
        "joint image+text only": ("fusion_joint", "redundant", None,
                                  combination("image", "text")),
        "joint audio+text only": ("fusion_joint", "redundant", None,
                                  combination("audio", "text")),
    }
  if part == "av_digits":
    if not args.tfds_dir:
      raise SystemExit("--parts=av_digits needs --tfds_dir (the prepared av_digits)")
    data = {"data.data_dir": args.tfds_dir}
    return {
        "mmp": ("av_digits_fusion_concat", "mcar",
                {"kind": "mmp", "backbone": "joint", "mask_rate": 0.3,
                 "backbone_config": {"num_layers": 2, "num_heads": 4}}, data),
        "concat_mcar": ("av_digits_fusion_concat", "mcar", None, data),
        "flexmoe": ("av_digits_fusion_flexmoe", None, None, data),
    }
  raise ValueError(part)


def _combination(modalities):
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.missing_config("combination", combinations=(tuple(modalities),))


def part_training(args, part, results):
  conditions = AV_CONDITIONS if part == "av_digits" else CONDITIONS
  rows = results.setdefault(part, {})
  wanted = set(args.runs.split(",")) if args.runs else None
  for label, (name, arg, fusion, fields) in _runs(args, part).items():
    if wanted is not None and label not in wanted:
      continue
    load1 = note_load(f"{part} {label}")
    config = load(name, arg, fusion, **fields)
    if args.steps:
      config.total_steps = args.steps
      config.checkpoint_every_steps = config.eval_every_steps = args.steps
      config.optimizer.warmup_steps = max(1, args.steps // 5)
      rate = config.model.fusion.get("mask_rate")
      if hasattr(rate, "begin"):        # MMP's ramp: the same fifths of the budget
        rate.begin, rate.steps = args.steps // 5, max(1, args.steps // 5)
    if args.batch_size:
      config.batch_size = args.batch_size
    if args.test_size and "sizes" in config.data:
      config.data.sizes.test = args.test_size
    row = train(config, os.path.join(args.workdir, part, label.replace(" ", "_")),
                conditions)
    row["load_average_1min"] = load1
    row["budget"] = {"steps": config.total_steps, "batch_size": config.batch_size}
    rows[label] = row
    save(args, results)
    print(f"{label}: " + ", ".join(f"{c} {row[c]:.3f}" for c in conditions
                                   if row.get(c) is not None)
          + f" ({row['seconds']:.0f} s)", flush=True)
  table(rows, conditions)


def part_cost(args, results):
  """Compiled memory and step time of the gradient step, pooled vs token fusion."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax.fusion import heads  # pylint: disable=g-import-not-at-top
  from mmjax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  batch_size = 128
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.random((batch_size, 32, 32, 3)), jnp.float32),
           "audio": jnp.asarray(rng.normal(size=(batch_size, 4000)) * 0.1, jnp.float32),
           "text": jnp.asarray(rng.integers(3, 200, (batch_size, 32)), jnp.int32),
           "mask": {m: jnp.ones(batch_size, bool) for m in ("audio", "image", "text")}}
  labels = jnp.asarray(rng.integers(0, 3, batch_size))
  rows = results.setdefault("cost", {})
  for label, (name, fusion) in {**POOLED_KINDS, **TOKEN_KINDS}.items():
    note_load(f"cost {label}")
    model = model_lib.build(load(name, "interaction", fusion).model)
    variables = jax.jit(lambda b: model.init(  # noqa: B023
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, b))(batch)

    def loss(params, batch, rng):
      out = model.apply({**variables, "params": params}, batch, train=True,  # noqa: B023
                        rngs={"dropout": rng})
      return heads.task_loss(out.logits, labels) + sum(
          v for k, v in out.aux.items() if k.startswith("loss/"))

    grad = jax.jit(jax.value_and_grad(loss))
    compiled = grad.lower(variables["params"], batch, jax.random.key(2)).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(variables["params"], batch, jax.random.key(2)))
    start, steps = time.perf_counter(), 5
    for i in range(steps):
      jax.block_until_ready(compiled(variables["params"], batch, jax.random.key(i)))
    rows[label] = {
        "params": int(sum(x.size for x in jax.tree.leaves(variables["params"]))),
        "temp_mib": round(memory.temp_size_in_bytes / 2 ** 20, 1),
        "step_ms": round(1000 * (time.perf_counter() - start) / steps, 1),
        "load_average_1min": round(os.getloadavg()[0], 2)}
    print(label, rows[label], flush=True)
    save(args, results)


def save(args, results):
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--runs", default="", help="comma-separated run labels of a part")
  parser.add_argument("--tfds_dir", help="the prepared av_digits (--parts=av_digits)")
  parser.add_argument("--steps", type=int, default=0, help="training steps of every run")
  parser.add_argument("--batch_size", type=int, default=0)
  parser.add_argument("--test_size", type=int, default=0,
                      help="test examples of the world's robustness evaluation")
  args = parser.parse_args()
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; valid: {list(PARTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  path = os.path.join(args.workdir, "results.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  for part in parts:
    if part == "cost":
      part_cost(args, results)
    else:
      part_training(args, part, results)
  print(f"\nresults: {path}")


if __name__ == "__main__":
  main()
