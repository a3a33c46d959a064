"""The `imbalance` evaluator: how much each modality's encoder learnt in a jointly
trained model (BalanceBenchmark's measures).

For a model with a task head and M >= 2 modalities, on clean data (every modality
present):

  <m>/probe_accuracy   a linear probe (L2 logistic regression, `classification.
                       linear_probe`) on encoder m's features (`representation`), fit
                       on the first `train_examples` of `train_split`, its l2 picked on
                       `val_split`, scored on `split`
  <m>/alone            the same probe's accuracy for encoder m trained alone, when the
                       config gives it (`alone`: pairs (modality, accuracy), e.g. from a
                       run of the unimodal config)
  <m>/gap              alone - probe_accuracy: what joint training cost encoder m
  fused/accuracy       the task head's accuracy with every modality present
  imbalance_ratio      the best modality's probe accuracy over the worst's, the worst
                       taken at chance or above (1: even)
  chance               1 / number of classes

and a markdown table of these for summary.md (one row per modality).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mmjax.evals import classification as classification_lib
from mmjax.evals.evaluators import EvalContext, _Head, labels, num_classes, register


def _alone(c, where: str) -> dict[str, float]:
  out = {}
  for pair in c.alone:
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"{where}.alone: each entry is (modality, accuracy), got {pair!r}")
    m, acc = pair
    if not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
      raise ValueError(f"{where}.alone: accuracy of {m!r} must be in [0, 1], got {acc!r}")
    out[m] = float(acc)
  return out


def _check(c, data, where: str) -> None:
  del data
  if c.representation not in ("embeddings", "features"):
    raise ValueError(f"{where}.representation must be 'embeddings' or 'features', got "
                     f"{c.representation!r}")
  _alone(c, where)


def imbalance_metrics(probe: Mapping[str, float], fused: float, chance: float,
                      alone: Mapping[str, float] | None = None) -> dict[str, float]:
  """The evaluator's metrics from per-modality probe accuracies, the fused accuracy,
  chance and (optionally) the accuracies of the encoders trained alone."""
  metrics = {"fused/accuracy": float(fused), "chance": float(chance)}
  for m, acc in probe.items():
    metrics[f"{m}/probe_accuracy"] = float(acc)
    if alone and m in alone:
      metrics[f"{m}/alone"] = float(alone[m])
      metrics[f"{m}/gap"] = float(alone[m]) - float(acc)
  values = list(probe.values())
  metrics["imbalance_ratio"] = float(max(values) / max(min(values), chance))
  return metrics


def markdown_table(metrics: Mapping[str, float], modalities) -> str:
  """One row per modality: its probe accuracy jointly trained, alone and the gap."""
  lines = ["| modality | probe accuracy (joint) | probe accuracy (alone) | gap |",
           "|---|---|---|---|"]
  for m in modalities:
    alone = metrics.get(f"{m}/alone")
    lines.append(f"| {m} | {metrics[f'{m}/probe_accuracy']:.3f} | "
                 + (f"{alone:.3f} | {metrics[f'{m}/gap']:+.3f} |" if alone is not None
                    else "| |"))
  lines.append(f"\nfused accuracy {metrics['fused/accuracy']:.3f}; imbalance ratio "
               f"{metrics['imbalance_ratio']:.2f}; chance {metrics['chance']:.4f}")
  return "\n".join(lines)


@register("imbalance", check=_check)
def imbalance(ctx: EvalContext, c) -> dict[str, float]:
  """Per-modality probe accuracies, the fused accuracy and the imbalance ratio."""
  if len(ctx.modalities) < 2:
    raise ValueError(f"{ctx.where}: the imbalance evaluator compares modalities; the model "
                     f"has {list(ctx.modalities)}")
  featurize = ctx.featurize.without_missingness()
  outs = []
  for split, n in ((c.train_split, c.train_examples), (c.val_split, None), (c.split, None)):
    source = ctx.source(split)
    if n is not None:
      source = _Head(source, n)
    outs.append(ctx.run(source, featurize, c.batch_size, (c.representation, "logits",
                                                          "label")))
  ys = [labels(o, ctx.where) for o in outs]
  k = num_classes(ctx.data, ys)
  if outs[2]["logits"] is None:
    raise ValueError(f"{ctx.where}: the imbalance evaluator needs task logits: the model "
                     "has no task head (set model.fusion and model.task)")
  probe = {}
  for m in ctx.modalities:
    arrays = []
    for o, y in zip(outs, ys):
      arrays += [np.asarray(o[c.representation][m], np.float32), y]
    probe[m] = classification_lib.linear_probe(*arrays, l2_grid=tuple(c.l2_grid),
                                               steps=c.steps,
                                               num_classes=k)["test_accuracy"]
  fused = float(np.mean(np.argmax(outs[2]["logits"], -1) == ys[2]))
  metrics = imbalance_metrics(probe, fused, 1.0 / k, _alone(c, ctx.where))
  ctx.add_report(f"Modality imbalance ({ctx.name or 'imbalance'})",
                 f"Split `{c.split}`, step {ctx.step}; linear probes on each encoder's "
                 f"{c.representation}.\n\n" + markdown_table(metrics, ctx.modalities))
  return metrics
