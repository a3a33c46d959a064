"""The `linear_probe` and `knn` evaluators: classifiers on frozen representations."""

from __future__ import annotations

from mmjax.evals import classification as classification_lib
from mmjax.evals.evaluators import EvalContext, labels, num_classes, present, register


def _check(c, data, where: str) -> None:
  del data
  if c.representation not in ("embeddings", "features"):
    raise ValueError(f"{where}.representation must be 'embeddings' or 'features', got "
                     f"{c.representation!r}")


def _splits(ctx: EvalContext, c, splits):
  """Per split of `splits`: ({m: representation [N_m, D]} of present rows, {m: labels})."""
  outs = [ctx.outputs(s, c.batch_size, n) for s, n in splits]
  ys = [labels(o, ctx.where) for o in outs]
  k = num_classes(ctx.data, ys)
  modalities = list(c.modalities) or list(ctx.modalities)
  parts = {m: [] for m in modalities}
  for o, y in zip(outs, ys):
    for m in modalities:
      keep = present(o, (m,))
      parts[m] += [o[c.representation][m][keep], y[keep]]
  return parts, k


@register("linear_probe", check=_check)
def linear_probe(ctx: EvalContext, c) -> dict[str, float]:
  """L2-regularised logistic regression on frozen embeddings, per modality.

  Fits on the first `train_examples` of `train_split`, picks the l2 of `l2_grid`
  with the best accuracy on `val_split`, reports accuracy on `split`
  (see `classification.linear_probe`). Fields: `modalities` (default all),
  `representation` ('embeddings', or 'features' before the projection head).

  Metrics per modality m: `m/accuracy` (test), `m/val_accuracy`, `m/l2`; and `chance`.
  """
  parts, k = _splits(ctx, c, ((c.train_split, c.train_examples), (c.val_split, None),
                              (c.split, None)))
  metrics = {"chance": 1.0 / k}
  for m, arrays in parts.items():
    result = classification_lib.linear_probe(*arrays, l2_grid=tuple(c.l2_grid),
                                             steps=c.steps, num_classes=k)
    metrics[f"{m}/accuracy"] = result["test_accuracy"]
    metrics[f"{m}/val_accuracy"] = result["val_accuracy"]
    metrics[f"{m}/l2"] = result["l2"]
  return metrics


@register("knn", check=_check)
def knn(ctx: EvalContext, c) -> dict[str, float]:
  """Cosine k-NN vote over the first `train_examples` of `train_split`, per modality.

  Fields: `modalities` (default all), `representation` ('embeddings' | 'features'),
  `k`, `temperature` (vote weight exp(cos / t); 0 for an unweighted vote).
  Metrics per modality m: `m/accuracy`, `m/mean_per_class_accuracy`; and `chance`.
  """
  parts, k = _splits(ctx, c, ((c.train_split, c.train_examples), (c.split, None)))
  metrics = {"chance": 1.0 / k}
  for m, arrays in parts.items():
    result = classification_lib.knn_classify(*arrays, k=c.k,
                                             temperature=c.temperature or None,
                                             num_classes=k)
    metrics[f"{m}/accuracy"] = result["accuracy"]
    metrics[f"{m}/mean_per_class_accuracy"] = result["mean_per_class_accuracy"]
  return metrics
