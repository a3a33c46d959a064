"""The figures of benchmarks/README.md, "Modality balance": the balance methods on an
imbalanced world task and on av_digits, and ICYM2I under missing-not-at-random data.

    python benchmarks/bench_balance.py --workdir=WORK [--parts=world,av_digits,icym2i,comm]
        [--tfds_dir=DIR]   # av_digits prepared (python -m mmjax.data.prepare av_digits)

Parts:

  world      configs/balance_world.py: each encoder trained alone (a linear probe on its
             features), then joint training without modulation and with each method
             (`imbalance` evaluator: both encoders' probe accuracies, the fused accuracy)
  av_digits  the same on av_digits (configs/av_digits_fusion_concat.py:complete, audio +
             image, `--steps` steps of 64; unimodal heads of weight 0.1 as the methods'
             scores, 2 for mlb)
  icym2i     configs/balance_world.py:none trained on data with audio missing not at
             random, on the label and on the size factor; the robustness evaluator's
             ICYM2I estimates (naive, IPW, true) for each modality
  comm       configs/comm_world.py: CoMM, pairwise and GRAM, probes of the fused or
             concatenated embeddings for shared, unique and synergistic factors

Each part writes WORK/<part>.json and prints a markdown table. One training at a time;
the load average is printed before each part (accuracies do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench_common import load, note_load

PARTS = ("world", "av_digits", "icym2i", "comm")
METHODS = ("none", "ogm_ge", "mlb", "inforeg", "cggm")


def train(config, workdir):
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  start = time.time()
  metrics = trainer.train_and_evaluate(config, workdir)
  return metrics, time.time() - start


def balance_table(rows, weak, strong):
  lines = [f"| method | {weak} probe (weak) | {strong} probe (strong) | fused | "
           f"{weak} alone | {strong} alone | weak raised | fused raised | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
  base = rows["none"]
  for method, r in rows.items():   # the control row is compared with 'none' too
    raised = "" if method == "none" else (
        f"{'yes' if r['weak'] > base['weak'] else 'no'} | "
        f"{'yes' if r['fused'] > base['fused'] else 'no'}")
    lines.append(f"| {method} | {r['weak']:.3f} | {r['strong']:.3f} | {r['fused']:.3f} | "
                 f"{r['weak_alone']:.3f} | {r['strong_alone']:.3f} | "
                 f"{raised or ' | '} | {r['wall']:.0f} |")
  return "\n".join(lines)


def run_balance(args, part, make, weak, strong):
  """Alone runs, then every method; `make(variant)` -> config."""
  alone = {}
  for m in (weak, strong):
    metrics, _ = train(make(f"{m}_only"), os.path.join(args.workdir, part, f"{m}_only"))
    alone[m] = metrics[f"eval/probe/{m}/accuracy"]
  rows = {}
  for method in METHODS + ("none, heads w=2",):
    config = make(method.split(",")[0])
    if method != "none" and method.startswith("none"):    # the control for mlb's heads
      config.model.task.unimodal_weight = 2.0
    config.evals.imbalance.alone = tuple(alone.items())
    metrics, wall = train(config, os.path.join(args.workdir, part, method.replace(", ", "_")
                                               .replace(" ", "").replace("=", "")))
    get = lambda k: metrics[f"eval/imbalance/{k}"]
    rows[method] = {"weak": get(f"{weak}/probe_accuracy"),
                    "strong": get(f"{strong}/probe_accuracy"),
                    "fused": get("fused/accuracy"), "weak_alone": alone[weak],
                    "strong_alone": alone[strong], "wall": wall}
    print(balance_table(rows, weak, strong), flush=True)
  return rows


def part_world(args):
  rows = run_balance(args, "world", lambda v: load("balance_world", v), "audio", "image")
  return {"rows": rows, "table": balance_table(rows, "audio", "image")}


def av_digits_config(args, variant):
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  alone = variant.endswith("_only")
  c = load("av_digits_fusion_concat", variant if alone else "complete",
           **{"data.data_dir": args.tfds_dir})
  c.total_steps, c.batch_size = args.steps, 64
  c.checkpoint_every_steps = c.eval_every_steps = args.steps
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, args.steps // 6)
  probe = dict(split="test", every=0, batch_size=300, representation="features",
               train_examples=2400)
  if alone:
    c.evals = ml_collections.ConfigDict(
        {"probe": config_lib.evaluator_config("linear_probe", **probe)})
    return c
  c.name = f"av_digits_balance_{variant}"
  c.model.task.unimodal_weight = 2.0 if variant == "mlb" else 0.1
  c.balance.method = "" if variant == "none" else variant
  c.balance.inforeg.period = max(args.steps // 20, 1)
  c.evals = ml_collections.ConfigDict(
      {"imbalance": config_lib.evaluator_config("imbalance", **probe)})
  return c


def part_av_digits(args):
  if not args.tfds_dir:
    raise SystemExit("--parts=av_digits needs --tfds_dir, where av_digits is prepared")
  rows = run_balance(args, "av_digits", lambda v: av_digits_config(args, v), "audio",
                     "image")
  return {"rows": rows, "table": balance_table(rows, "audio", "image")}


ICYM2I_SETTINGS = {
    # Audio mostly missing for the first colours (labels 0-8 of 18: colour x size).
    "label": {"mnar_on": "label", "mnar_rates": {"audio": (0.8,) * 9 + (0.1,) * 9,
                                                 "image": ()}},
    # Audio missing for small shapes, the quietest sounds (the hardest).
    "size": {"mnar_on": "size", "mnar_rates": {"audio": (0.8, 0.4, 0.0), "image": ()}},
}


def part_icym2i(args):
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for name, setting in ICYM2I_SETTINGS.items():
    c = load("balance_world", "none")
    c.data.missing = config_lib.missing_config("mnar", modalities=("audio", "image"),
                                               seed=3, **setting)
    c.evals.robustness = config_lib.evaluator_config(
        "robustness", split="test", every=0, batch_size=256, rates=(0.0,), icym2i=True,
        plot=False)
    metrics, wall = train(c, os.path.join(args.workdir, "icym2i", name))
    from mmjax.evals.evaluators import robustness  # pylint: disable=g-import-not-at-top
    found = {k.removeprefix("eval/robustness/"): v for k, v in metrics.items()
             if k.startswith("eval/robustness/icym2i/")}
    out[name] = {"metrics": found, "wall": wall,
                 "table": robustness.icym2i_table(found, ("audio", "image"))}
    print(f"\nmissing not at random on {name}:\n{out[name]['table']}", flush=True)
  return out


def part_comm(args):
  out = {}
  for variant in ("comm", "pairwise", "gram"):
    metrics, wall = train(load("comm_world", variant),
                          os.path.join(args.workdir, "comm", variant))
    found = {k.removeprefix("eval/factors/"): v for k, v in metrics.items()
             if k.startswith("eval/factors/")}
    out[variant] = {"metrics": found, "wall": wall}
    print(variant, json.dumps(found, indent=1), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default=",".join(PARTS[:1] + PARTS[2:]))
  parser.add_argument("--tfds_dir", default="", help="where av_digits is prepared")
  parser.add_argument("--steps", type=int, default=300, help="av_digits steps")
  args = parser.parse_args()
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise SystemExit(f"--parts: unknown {unknown}; valid: {list(PARTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  for part in parts:
    note_load(part)
    result = globals()[f"part_{part}"](args)
    with open(os.path.join(args.workdir, f"{part}.json"), "w") as f:
      json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
