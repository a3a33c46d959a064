"""The `retrieval` evaluator: R@k, median and mean rank between pairs of modalities."""

from __future__ import annotations

import numpy as np

from mmjax.evals import grouped_retrieval
from mmjax.evals import retrieval as retrieval_lib
from mmjax.evals.evaluators import EvalContext, pairs_of, present, register

RELEVANCE = ("instance", "class")


def _check(c, data, where: str) -> None:
  del data
  relevance = c.get("relevance", "instance")
  if relevance not in RELEVANCE:
    raise ValueError(f"{where}.relevance: unknown {relevance!r}; valid: {RELEVANCE} "
                     "('instance': each query's own pair; 'class': every item of its label)")
  if not isinstance(c.get("all_captions", True), bool):
    raise ValueError(f"{where}.all_captions must be True or False, got "
                     f"{c.all_captions!r}")


def _texts_of_split(ctx: EvalContext, split: str, modality: str):
  """Every text of `modality` of every example of `split` (a list of tuples) when the
  source has several per example (a Sequence of captions), else None."""
  key = ("retrieval_all_texts", split, modality)
  if key not in ctx._cache:
    all_texts = getattr(ctx.source(split), "all_texts", None)
    ctx._cache[key] = all_texts(modality) if all_texts is not None else None
  return ctx._cache[key]


def _side(ctx: EvalContext, c, outputs, modality: str, rows: np.ndarray):
  """(embeddings [n, D], owner [n]) of `modality` on the kept `rows`: one per row, or,
  for several captions per example, every caption with the kept row it belongs to."""
  texts = _texts_of_split(ctx, c.split, modality) if c.get("all_captions", True) else None
  if texts is None:
    return outputs["embeddings"][modality][rows], np.arange(len(rows))
  kept = [texts[i] for i in rows]
  owner = grouped_retrieval.caption_groups([len(t) for t in kept])
  flat = [t for captions in kept for t in captions]
  key = ("retrieval_captions", c.split, modality, tuple(rows), c.batch_size)
  if key not in ctx._cache:
    ctx._cache[key] = ctx.embed_texts(flat, c.batch_size, modality=modality)
  return ctx._cache[key], owner


@register("retrieval", check=_check)
def retrieval(ctx: EvalContext, c) -> dict[str, float]:
  """R@k, median and mean rank for every pair of modalities, both directions.

  Fields: `pairs` (list of [a, b]; default every pair of the model's modalities),
  `ks` (default (1, 5, 10)), `plot_max_k` (the recall@K curve plot goes up to this K,
  capped at N; 0: no plot), `relevance` ('instance': query i's match is item i;
  'class': every item with the query's label is relevant, and `P@k` and `mAP` are
  logged too), `all_captions` (True: when the source has several captions per example,
  every one of them takes part, COCO's protocol: a -> text is a hit when ANY caption of
  the example is in the top k, text -> b ranks each caption's one item; False: the
  first caption only). Only rows where both modalities are present take part. Where
  the source knows it (the procedural world), 1:1 instance retrieval also logs the R@1
  ceiling (`R@1_ceiling`): the expected R@1 of an oracle that knows exactly what both
  modalities carry.
  """
  outputs = ctx.outputs(c.split, c.batch_size)
  by_class = c.get("relevance", "instance") == "class"
  labels = outputs.get("label")
  if by_class and labels is None:
    raise ValueError(f"{ctx.where}.relevance='class' needs labels, but the data "
                     f"({ctx.data.name}) has no 'label'")
  metrics, curves = {}, {}
  for a, b in pairs_of(c, ctx.modalities):
    keep = present(outputs, (a, b))
    rows = np.flatnonzero(keep)
    sides = {m: _side(ctx, c, outputs, m, rows) for m in (a, b)}
    factors = outputs.get("factors")
    for query, target in ((a, b), (b, a)):
      (q, q_owner), (t, t_owner) = sides[query], sides[target]
      name = f"{query}->{target}"
      one_to_one = len(q) == len(t) == len(rows)
      if by_class:
        row_labels = labels[rows].astype(np.int64)
        stats = grouped_retrieval.grouped_stats(
            q, t, row_labels[q_owner], row_labels[t_owner], tuple(c.ks), mesh=ctx.mesh)
        found = grouped_retrieval.stats_metrics(stats, tuple(c.ks), len(t))
        ranks = stats["rank"]
      elif one_to_one:
        ranks = retrieval_lib.retrieval_ranks(q, t, mesh=ctx.mesh)
        found = retrieval_lib.metrics_from_ranks(ranks, tuple(c.ks))
      else:
        ranks = grouped_retrieval.grouped_ranks(q, t, q_owner, t_owner, mesh=ctx.mesh)
        found = retrieval_lib.metrics_from_ranks(ranks, tuple(c.ks), num_targets=len(t))
      for k, v in found.items():
        metrics[f"{name}/{k}"] = v
      if (not by_class and one_to_one and ctx.data.retrieval_ceiling is not None
          and factors is not None):
        metrics[f"{name}/R@1_ceiling"] = ctx.data.retrieval_ceiling(
            query, (target,), factors[keep])
      if c.plot_max_k:
        curves[name] = retrieval_lib.recall_at_k_curve(ranks, min(c.plot_max_k, len(t)))
  if curves and ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_recall_at_k(curves, ctx.plot_path("recall_at_k.png"),
                           title=f"Recall@K on {c.split} (step {ctx.step})")
  return metrics
