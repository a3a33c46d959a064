"""The end-of-run report: `summary.md` and the training-curves plot.

`summary.md` says what ran (config name, mode, steps, batch, wall time), then the final
metrics as tables grouped by evaluator (`eval/<name>/...`), then the sections evaluators
added with `ctx.add_report(title, markdown)`, then links to the plots.
"""

from __future__ import annotations

import collections
import numbers
import os
from typing import Mapping

TRAINING_CURVES = "training_curves.png"


def _format(v) -> str:
  if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
    return f"{float(v):.4g}"      # python and numpy floats alike
  return str(v)


def metrics_table(metrics: Mapping[str, float]) -> str:
  """A two-column markdown table, keys sorted."""
  lines = ["| metric | value |", "|---|---|"]
  for k in sorted(metrics):
    lines.append(f"| `{k}` | {_format(metrics[k])} |")
  return "\n".join(lines)


def group_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
  """'eval/<name>/<rest>' -> group '<name>', key '<rest>'; 'train/<rest>' -> 'train';
  anything else -> 'other'. Groups in order: train, evaluators by name, other."""
  groups: dict[str, dict[str, float]] = collections.defaultdict(dict)
  for k, v in metrics.items():
    parts = k.split("/")
    if parts[0] == "eval" and len(parts) >= 3:
      groups[parts[1]]["/".join(parts[2:])] = v
    elif parts[0] == "train" and len(parts) >= 2:
      groups["train"]["/".join(parts[1:])] = v
    else:
      groups["other"][k] = v
  order = (["train"] if "train" in groups else []) + sorted(
      g for g in groups if g not in ("train", "other")) + (
          ["other"] if "other" in groups else [])
  return {g: dict(groups[g]) for g in order}


def group_table(metrics: Mapping[str, float]) -> str:
  """One evaluator's metrics as markdown.

  Keys 'row/column' (split at the last '/') with at least two distinct rows become a
  matrix (e.g. retrieval: one row per direction, one column per metric); the other
  keys go to a two-column table above it.
  """
  nested = collections.defaultdict(dict)
  for k, v in metrics.items():
    if "/" in k:
      row, col = k.rsplit("/", 1)
      nested[row][col] = v
  if len(nested) < 2:
    return metrics_table(metrics)
  flat = {k: v for k, v in metrics.items() if "/" not in k}
  columns = []
  for row in nested.values():
    columns += [c for c in row if c not in columns]
  parts = [metrics_table(flat), ""] if flat else []
  parts.append("| | " + " | ".join(f"`{c}`" for c in columns) + " |")
  parts.append("|---" * (len(columns) + 1) + "|")
  for row in sorted(nested):
    cells = [_format(nested[row][c]) if c in nested[row] else "" for c in columns]
    parts.append(f"| `{row}` | " + " | ".join(cells) + " |")
  return "\n".join(parts)


def write_summary(workdir: str, config, metrics: Mapping[str, float], *, wall_time: float,
                  start_step: int = 0, step: int | None = None, mode: str = "train",
                  extra_sections: Mapping[str, str] = ()) -> str:
  """Writes WORKDIR/summary.md; returns its path.

  Args:
    workdir: the folder to write to (its plots/*.png are linked).
    config: the run's config (`name`, `total_steps`, `batch_size`, model, objective).
    metrics: final metrics, 'train/...' and 'eval/<evaluator>/...'.
    wall_time: seconds this run took.
    start_step: the step it resumed from (0: a fresh run).
    step: the step the metrics belong to (default `config.total_steps`).
    mode: 'train', or 'eval' for `--mode=eval` on a checkpoint.
    extra_sections: title -> markdown, added after the metrics (`ctx.add_report`).
  """
  path = os.path.join(workdir, "summary.md")
  step = config.total_steps if step is None else step
  if mode == "eval":
    what = f"- mode: eval of the checkpoint at step {step} (of {config.total_steps})"
  else:
    resumed = f" (resumed from step {start_step})" if start_step else ""
    what = f"- mode: train, steps: {step}{resumed}"
  parts = [
      f"# {config.name}",
      "",
      f"- config: `{config.name}`",
      what,
      f"- global batch size: {config.batch_size}",
      f"- wall time of this run: {wall_time:.1f} s",
      f"- modalities: {', '.join(sorted(config.model.encoders.keys()))}",
      f"- objective: {config.objective.kind}",
  ]
  groups = group_metrics(metrics)
  if "train" in groups:
    parts += ["", f"## Training (step {step})", "", group_table(groups.pop("train"))]
  for name, group in groups.items():
    title = "Other metrics" if name == "other" else f"Evaluation: {name}"
    parts += ["", f"## {title}", "", group_table(group)]
  for title, body in dict(extra_sections).items():
    parts += ["", f"## {title}", "", body.rstrip()]
  plot_dir = os.path.join(workdir, "plots")
  pngs = sorted(f for f in os.listdir(plot_dir) if f.endswith(".png")) if os.path.isdir(
      plot_dir) else []
  if pngs:
    parts += ["", "## Plots", ""] + [f"- [{f}](plots/{f})" for f in pngs]
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(parts) + "\n")
  return path


# At most this many panels of eval metrics; the rest are in metrics.jsonl.
MAX_EVAL_PANELS = 9


def plot_training_curves(workdir: str, name: str | None = None) -> str | None:
  """WORKDIR/plots/training_curves.png from WORKDIR/metrics.jsonl: loss, learning rate,
  logit scale, and the eval metrics measured at two steps or more (per-class accuracies
  aside), against step, titled with the run's `name`. None when there is nothing to
  plot."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(metrics_path):
    return None
  from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
  series = plots.read_metrics_jsonl(metrics_path)
  # An evaluator run only at the end is one point: a table in summary.md, not a curve.
  keys = [k for k, (steps, _) in series.items()
          if not k.startswith("eval/") or (len(steps) >= 2 and "/per_class/" not in k)]
  panels = plots.default_training_panels(keys)
  evals = [t for t in panels if all(k.startswith("eval/") for k in panels[t])]
  for title in evals[MAX_EVAL_PANELS:]:
    del panels[title]
  if not panels:
    return None
  return plots.plot_training_curves(metrics_path,
                                    os.path.join(workdir, "plots", TRAINING_CURVES),
                                    panels=panels,
                                    title=f"Training curves: {name or os.path.basename(workdir)}")
