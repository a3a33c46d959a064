"""The `robustness` evaluator: task accuracy and calibration under missing modalities.

For a model with a task head (`output.logits`) and M modalities it measures, on one
split:

  * every one of the 2^M - 1 modality combinations: only the modalities of the
    combination are present (the others zero-filled and masked, as the pipeline does);
  * test-time missing rates r (default 0, 0.1, 0.3, 0.5, 0.7): each modality of each
    example is missing independently with probability r, seeded per example, and an
    example that lost every modality gets one back (`mmjax.data.missing`, kind 'mcar').

Metrics (the runner prefixes `eval/<name>/`):

  <combination>/accuracy, <combination>/ece   combination names sorted, joined by '+'
  <condition>/ceiling                         procedural world only: accuracy of an
                                              oracle that knows exactly the factors the
                                              present modalities express (for missing
                                              rates: its mean over the examples)
  missing_<r>/accuracy, missing_<r>/ece       r as written in `rates`, e.g. missing_0.3
  chance                                      accuracy of always predicting the most
                                              likely class (world: exact; otherwise the
                                              split's majority-class frequency)

It draws a heatmap of these (WORKDIR/plots/<name>_heatmap.png) and adds the markdown
table (`markdown_table`) to summary.md as a section.

Fields of `config.evals.<name>`: `split`, `batch_size`, `rates`, `n_bins` (ECE bins,
default 15), `seed` (of the test-time missingness, default 0), `plot` (default True).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import missing as missing_lib
from mmjax.data import pipeline
from mmjax.data import world as world_lib
from mmjax.evals import calibration
from mmjax.evals import plots
from mmjax.evals.evaluators import EvalContext, register

DEFAULT_RATES = (0.0, 0.1, 0.3, 0.5, 0.7)


class _CachedSource:
  """Featurises each example of a split once (all modalities present) and keeps it."""

  def __init__(self, source, featurize):
    self._source, self._featurize, self._rows = source, featurize, {}

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index: int):
    if index not in self._rows:
      self._rows[index] = self._featurize((index, self._source[index]))
    return self._rows[index]


class _WithPresence:
  """(index, clean example) -> a copy with `present(index, example)` applied: absent
  inputs zero-filled and masked, as `Missingness` does in the training pipeline."""

  def __init__(self, present):
    self._present = present

  def __call__(self, index_and_example):
    index, example = index_and_example
    out = dict(example, mask=dict(example["mask"]))
    for m, here in self._present(index, example).items():
      out["mask"][m] = np.bool_(here)
      if not here:
        out[m] = np.zeros_like(example[m])
    return out


def model_modalities(config) -> tuple[str, ...]:
  return tuple(sorted(config.model.encoders.keys()))


def predict(ctx: EvalContext, source, featurize, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """Logits [N, C], labels [N] and mask {m: bool [N]} of the model on a whole split."""
  num_data = ctx.mesh.shape["data"]
  if batch_size % num_data or batch_size % jax.process_count():
    raise ValueError(f"robustness batch_size {batch_size} must be divisible by the "
                     f"{num_data} devices and {jax.process_count()} processes")
  pieces = []
  for local_batch, valid in pipeline.eval_batches(source, featurize,
                                                   global_batch_size=batch_size):
    if "label" not in local_batch:
      raise ValueError("the robustness evaluator needs labels, but the data has no "
                       "'label' (configure data.label)")
    batch = pipeline.to_global(local_batch, ctx.mesh)
    out = ctx.apply_fn(ctx.params, batch)
    if out.logits is None:
      raise ValueError("the robustness evaluator needs task logits: the model has no "
                       "task head (set model.fusion and model.task)")
    host = {"logits": out.logits, "label": batch["label"], "mask": batch["mask"]}
    host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        host)
    pieces.append(jax.tree.map(lambda x: x[:valid], host))
  host = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
  return host["logits"], host["label"], host["mask"]


def accuracy_and_ece(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15
                     ) -> tuple[float, float]:
  """Top-1 accuracy and expected calibration error (softmax confidences)."""
  logits = np.asarray(logits, np.float64)
  accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
  ece = calibration.expected_calibration_error(logits, labels, n_bins, from_logits=True)
  return accuracy, ece


def _label_distribution(spec: world_lib.WorldSpec, known: set[str]) -> float:
  """Largest probability of one label given the values of the `known` factors."""
  unknown = [len(world_lib.FACTORS[f]) for f in spec.label_factors if f not in known]
  if spec.label_mode == "product":
    return 1.0 / math.prod(unknown)
  # sum_mod: the label is a known offset plus the sum of independent uniform unknown
  # factors, modulo K; the offset only shifts the distribution.
  k = spec.label_num_classes
  dist = np.zeros(k)
  dist[0] = 1.0
  for n in unknown:
    step = np.zeros(k)
    for v in range(n):
      step[v % k] += 1.0 / n
    dist = np.real(np.fft.ifft(np.fft.fft(dist) * np.fft.fft(step)))
  return float(dist.max())


def world_oracle_accuracy(spec: world_lib.WorldSpec, present: Sequence[str]) -> float:
  """Accuracy of an oracle that sees exactly the factors the `present` modalities
  express (the others are uniform and independent): the best possible accuracy."""
  known = set()
  for m in present:
    known |= set(spec.expresses.get(m, ()))
  return _label_distribution(spec, known)


def mean_oracle_accuracy(spec: world_lib.WorldSpec, mask: Mapping[str, np.ndarray]
                         ) -> float:
  """Mean over examples of `world_oracle_accuracy` for each example's present set.

  Args:
    spec: the world.
    mask: modality -> bool [N].
  """
  names = sorted(mask)
  present = np.stack([np.asarray(mask[m], bool) for m in names], axis=1)
  subsets, inverse = np.unique(present, axis=0, return_inverse=True)
  per_subset = np.array([world_oracle_accuracy(spec, [m for m, p in zip(names, row) if p])
                         for row in subsets])
  return float(np.mean(per_subset[inverse.reshape(-1)]))


def world_chance(spec: world_lib.WorldSpec) -> float:
  """Accuracy of always predicting the most likely label."""
  return _label_distribution(spec, set())


def rate_name(rate: float) -> str:
  return f"missing_{rate:g}"


def markdown_table(metrics: Mapping[str, float], modalities: Sequence[str],
                   rates: Sequence[float]) -> str:
  """The evaluator's metrics as a markdown table: one row per condition."""
  has_ceiling = any(k.endswith("/ceiling") for k in metrics)
  header = "| present / missing rate | accuracy | ECE |" + (" oracle |" if has_ceiling else "")
  lines = [header, "|---|---|---|" + ("---|" if has_ceiling else "")]
  rows = [(missing_lib.combination_name(s), missing_lib.combination_name(s))
          for s in missing_lib.all_combinations(modalities)]
  rows += [(rate_name(r), f"missing rate {r:g}") for r in rates]
  for key, label in rows:
    line = f"| {label} | {metrics[key + '/accuracy']:.3f} | {metrics[key + '/ece']:.3f} |"
    if has_ceiling:
      ceiling = metrics.get(key + "/ceiling")
      line += f" {ceiling:.3f} |" if ceiling is not None else " |"
    lines.append(line)
  lines.append(f"\nchance: {metrics['chance']:.4f}")
  return "\n".join(lines)


def plot_robustness(metrics: Mapping[str, float], modalities: Sequence[str],
                    rates: Sequence[float], path: str, title: str = "") -> str:
  """Heatmap: rows = combinations and missing rates, columns = accuracy, ECE (and the
  oracle's accuracy when known)."""
  keys = [missing_lib.combination_name(s) for s in missing_lib.all_combinations(modalities)]
  keys += [rate_name(r) for r in rates]
  columns = ["accuracy", "ece"]
  if any(k.endswith("/ceiling") for k in metrics):
    columns.append("ceiling")
  matrix = [[metrics.get(f"{k}/{col}", np.nan) for col in columns] for k in keys]
  labels = [c.replace("ceiling", "oracle") for c in columns]
  return plots.plot_heatmap(np.asarray(matrix, np.float64), keys, labels, path,
                            title=title, vmin=0.0, vmax=1.0)


def evaluate_robustness(ctx: EvalContext, *, split: str, batch_size: int,
                        rates: Sequence[float] = DEFAULT_RATES, n_bins: int = 15,
                        seed: int = 0) -> dict[str, float]:
  """The metrics of the module doc, without writing files."""
  rates = tuple(float(r) for r in rates)
  for r in rates:
    if not 0.0 <= r < 1.0:
      raise ValueError(f"robustness rates must be in [0, 1), got {r}")
  config = ctx.config
  modalities = model_modalities(config)
  try:
    raw = ctx.source(split)
  except ValueError as e:
    raise ValueError(f"robustness split {split!r}: {e}") from None
  clean = pipeline.Featurize.from_config(config.data, modalities)
  source = _CachedSource(raw, clean)

  conditions: list[tuple[str, Any]] = []
  for subset in missing_lib.all_combinations(modalities):
    chosen = set(subset)
    conditions.append((missing_lib.combination_name(subset),
                       lambda i, ex, chosen=chosen: {m: m in chosen for m in modalities}))
  for r in rates:
    missingness = missing_lib.Missingness(modalities, kind="mcar",
                                          rates={m: r for m in modalities}, seed=seed)
    conditions.append((rate_name(r), lambda i, ex, mi=missingness: mi.present(i, ex)))

  spec = world_lib.WorldSpec.from_config(config.data) if config.data.kind == "world" else None
  metrics: dict[str, float] = {}
  labels = None
  for name, present in conditions:
    logits, labels, mask = predict(ctx, source, _WithPresence(present), batch_size)
    accuracy, ece = accuracy_and_ece(logits, labels, n_bins)
    metrics[f"{name}/accuracy"] = accuracy
    metrics[f"{name}/ece"] = ece
    if spec is not None:
      metrics[f"{name}/ceiling"] = mean_oracle_accuracy(spec, mask)
  if spec is not None:
    metrics["chance"] = world_chance(spec)
  else:
    metrics["chance"] = float(np.max(np.bincount(labels)) / len(labels))
  return metrics


@register("robustness", fields={"rates": DEFAULT_RATES, "n_bins": 15, "seed": 0,
                                "plot": True})
def robustness(ctx: EvalContext, c) -> dict[str, float]:
  """Accuracy and ECE for every modality combination and test-time missing rate."""
  rates = tuple(c.rates)
  metrics = evaluate_robustness(ctx, split=c.split, batch_size=c.batch_size, rates=rates,
                                n_bins=c.n_bins, seed=c.seed)
  modalities = model_modalities(ctx.config)
  if ctx.writes_files and c.plot:
    os.makedirs(ctx.plot_dir, exist_ok=True)
    plot_robustness(metrics, modalities, rates, ctx.plot_path("heatmap.png"),
                    title=f"{ctx.config.name} (step {ctx.step})")
  ctx.add_report(f"Robustness to missing modalities ({ctx.name or 'robustness'})",
                 f"Split `{c.split}`, step {ctx.step}.\n\n"
                 + markdown_table(metrics, modalities, rates))
  return metrics
