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
  <condition>/ceiling                         where the source knows it (the procedural
                                              world): accuracy of an oracle that sees
                                              exactly what the present modalities carry
                                              (for missing rates: its mean over examples)
  missing_<r>/accuracy, missing_<r>/ece       r as written in `rates`, e.g. missing_0.3
  chance                                      accuracy of always predicting the most
                                              likely class (the source's, when it knows
                                              it exactly; otherwise the split's
                                              majority-class frequency)

It draws a heatmap of these (WORKDIR/plots/<name>_heatmap.png) and adds the markdown
table (`markdown_table`) to summary.md as a section.

With `icym2i=True` it also estimates, for each modality m, how informative m is under
the data's own missingness (`data.missing`), after ICYM2I (Chen et al., "In Case You
Missed It", 2025), on the same split:

  icym2i/<m>/accuracy/<estimate>    accuracy of the model given m alone
  icym2i/<m>/info_gain/<estimate>   E[log p(y | all) - log p(y | all but m)], nats: what
                                    m adds to the others
  icym2i/<m>/observed               the fraction of examples where m is observed

each as three estimates: `naive` (the mean over the examples where m is observed, all
a dataset with missing data offers), `ipw` (the same examples weighted by 1 / P(m
observed | example), the missingness model's propensity, self-normalised:
`ipw_estimate`) and `true` (the mean over every example, each modality rendered for
every one: what the world knows and a recorded dataset does not).

Fields of `config.evals.<name>`: `split`, `batch_size`, `rates`, `n_bins` (ECE bins,
default 15), `seed` (of the test-time missingness, default 0), `plot` (default True),
`icym2i` (default False).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from mmjax.data import missing as missing_lib
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


def accuracy_and_ece(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15
                     ) -> tuple[float, float]:
  """Top-1 accuracy and expected calibration error (softmax confidences)."""
  logits = np.asarray(logits, np.float64)
  accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
  ece = calibration.expected_calibration_error(logits, labels, n_bins, from_logits=True)
  return accuracy, ece


def check_rates(rates: Sequence[float], where: str = "robustness") -> tuple[float, ...]:
  rates = tuple(float(r) for r in rates)
  for r in rates:
    if not 0.0 <= r < 1.0:
      raise ValueError(f"{where}.rates must be in [0, 1), got {r}")
  return rates


def _check(c, data, where: str) -> None:
  del data
  check_rates(c.rates, where)
  if not isinstance(c.n_bins, int) or c.n_bins < 1:
    raise ValueError(f"{where}.n_bins must be a positive integer, got {c.n_bins!r}")
  if not isinstance(c.icym2i, bool):
    raise ValueError(f"{where}.icym2i must be True or False, got {c.icym2i!r}")


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
  rates = check_rates(rates)
  modalities = ctx.modalities
  source = _CachedSource(ctx.source(split), ctx.featurize.without_missingness())

  conditions: list[tuple[str, Any]] = []
  for subset in missing_lib.all_combinations(modalities):
    chosen = set(subset)
    conditions.append((missing_lib.combination_name(subset),
                       lambda i, ex, chosen=chosen: {m: m in chosen for m in modalities}))
  for r in rates:
    missingness = missing_lib.Missingness(modalities, kind="mcar",
                                          rates={m: r for m in modalities}, seed=seed)
    conditions.append((rate_name(r), lambda i, ex, mi=missingness: mi.present(i, ex)))

  metrics: dict[str, float] = {}
  labels = None
  for name, present in conditions:
    out = ctx.run(source, _WithPresence(present), batch_size, ("logits", "label", "mask"))
    if out["label"] is None:
      raise ValueError(f"{ctx.where}: the robustness evaluator needs labels, but the data "
                       f"({ctx.data.name}) has no 'label'")
    if out["logits"] is None:
      raise ValueError(f"{ctx.where}: the robustness evaluator needs task logits: the "
                       "model has no task head (set model.fusion and model.task)")
    labels = out["label"]
    accuracy, ece = accuracy_and_ece(out["logits"], labels, n_bins)
    metrics[f"{name}/accuracy"] = accuracy
    metrics[f"{name}/ece"] = ece
    if ctx.data.label_ceiling is not None:
      metrics[f"{name}/ceiling"] = ctx.data.label_ceiling(out["mask"])
  metrics["chance"] = (ctx.data.chance if ctx.data.chance is not None
                       else float(np.max(np.bincount(labels)) / len(labels)))
  return metrics


# ---------------------------------------------------------------------------------------
# ICYM2I: informativeness under missingness, naive and inverse-probability weighted.
# ---------------------------------------------------------------------------------------


def ipw_estimate(values, observed, propensity) -> float:
  """The self-normalised inverse-probability-weighted mean of `values` over the
  `observed` examples: sum(v / p) / sum(1 / p) over them (p: each one's probability of
  being observed). With the true propensities it estimates the mean over every
  example, observed or not."""
  values, observed = np.asarray(values, np.float64), np.asarray(observed, bool)
  propensity = np.asarray(propensity, np.float64)
  if not observed.any():
    return float("nan")
  if np.any(propensity[observed] <= 0):
    raise ValueError("ipw_estimate: an observed example has propensity 0")
  w = 1.0 / propensity[observed]
  return float(np.sum(w * values[observed]) / np.sum(w))


def _log_prob_of_label(logits, labels) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return np.take_along_axis(log_p, labels[:, None].astype(np.int64), 1)[:, 0]


def evaluate_icym2i(ctx: EvalContext, *, split: str, batch_size: int) -> dict[str, float]:
  """The `icym2i/...` metrics of the module doc."""
  missingness = getattr(ctx.featurize, "missingness", None)
  if missingness is None or missingness.kind == "none":
    raise ValueError(
        f"{ctx.where}.icym2i: ICYM2I weights each example where a modality is observed "
        "by 1 / P(observed), so it needs a model of the missingness: set data.missing "
        "(kind 'mcar', 'mnar' or 'combination'; docs/data.md), whose propensities it "
        "reads; the data here has none")
  modalities = ctx.modalities
  source = _CachedSource(ctx.source(split), ctx.featurize.without_missingness())

  def logits_with(present_set):
    out = ctx.run(source, _WithPresence(lambda i, ex: {m: m in present_set
                                                       for m in modalities}),
                  batch_size, ("logits", "label"))
    if out["logits"] is None or out["label"] is None:
      raise ValueError(f"{ctx.where}.icym2i needs task logits and labels")
    return out["logits"], out["label"].astype(np.int64)

  full, labels = logits_with(set(modalities))
  log_p_full = _log_prob_of_label(full, labels)
  rows = [source[i] for i in range(len(source))]
  observed = {m: np.array([missingness.present(i, r)[m] for i, r in enumerate(rows)])
              for m in modalities}
  propensity = {m: np.array([missingness.propensity(r)[m] for r in rows])
                for m in modalities}
  metrics = {}
  for m in modalities:
    alone, _ = logits_with({m})
    others = set(modalities) - {m}
    values = {"accuracy": (np.argmax(alone, -1) == labels).astype(np.float64)}
    if others:
      without, _ = logits_with(others)
      values["info_gain"] = log_p_full - _log_prob_of_label(without, labels)
    for name, v in values.items():
      metrics[f"icym2i/{m}/{name}/naive"] = (float(np.mean(v[observed[m]]))
                                             if observed[m].any() else float("nan"))
      metrics[f"icym2i/{m}/{name}/ipw"] = ipw_estimate(v, observed[m], propensity[m])
      metrics[f"icym2i/{m}/{name}/true"] = float(np.mean(v))
    metrics[f"icym2i/{m}/observed"] = float(np.mean(observed[m]))
  return metrics


def icym2i_table(metrics: Mapping[str, float], modalities: Sequence[str]) -> str:
  lines = ["| modality | quantity | observed | naive | IPW | true | naive error | IPW error |",
           "|---|---|---|---|---|---|---|---|"]
  for m in modalities:
    for name in ("accuracy", "info_gain"):
      key = f"icym2i/{m}/{name}"
      if f"{key}/true" not in metrics:
        continue
      naive, ipw, true = (metrics[f"{key}/{e}"] for e in ("naive", "ipw", "true"))
      lines.append(f"| {m} | {name.replace('_', ' ')} | {metrics[f'icym2i/{m}/observed']:.2f}"
                   f" | {naive:.3f} | {ipw:.3f} | {true:.3f} | {naive - true:+.3f} | "
                   f"{ipw - true:+.3f} |")
  return "\n".join(lines)


@register("robustness", check=_check)
def robustness(ctx: EvalContext, c) -> dict[str, float]:
  """Accuracy and ECE for every modality combination and test-time missing rate."""
  rates = tuple(c.rates)
  metrics = evaluate_robustness(ctx, split=c.split, batch_size=c.batch_size, rates=rates,
                                n_bins=c.n_bins, seed=c.seed)
  if ctx.writes_files and c.plot:
    os.makedirs(ctx.plot_dir, exist_ok=True)
    plot_robustness(metrics, ctx.modalities, rates, ctx.plot_path("heatmap.png"),
                    title=f"{ctx.name} (step {ctx.step})")
  ctx.add_report(f"Robustness to missing modalities ({ctx.name or 'robustness'})",
                 f"Split `{c.split}`, step {ctx.step}.\n\n"
                 + markdown_table(metrics, ctx.modalities, rates))
  if c.icym2i:
    informativeness = evaluate_icym2i(ctx, split=c.split, batch_size=c.batch_size)
    metrics.update(informativeness)
    ctx.add_report(f"Informativeness under missingness, ICYM2I ({ctx.name or 'robustness'})",
                   f"Split `{c.split}`, step {ctx.step}; naive: the examples where the "
                   "modality is observed; IPW: the same weighted by 1 / P(observed); "
                   "true: every example.\n\n" + icym2i_table(informativeness,
                                                             ctx.modalities))
  return metrics
