"""The `retrieval` evaluator: R@k, median and mean rank between pairs of modalities."""

from __future__ import annotations

from mmjax.evals import retrieval as retrieval_lib
from mmjax.evals.evaluators import EvalContext, pairs_of, present, register


@register("retrieval")
def retrieval(ctx: EvalContext, c) -> dict[str, float]:
  """R@k, median and mean rank for every pair of modalities, both directions.

  Fields: `pairs` (list of [a, b]; default every pair of the model's modalities),
  `ks` (default (1, 5, 10)), `plot_max_k` (the recall@K curve plot goes up to this K,
  capped at N; 0: no plot). Only rows where both modalities are present take part.
  Where the source knows it (the procedural world), it also logs the R@1 ceiling
  (`R@1_ceiling`): the expected R@1 of an oracle that knows exactly what both
  modalities carry.
  """
  outputs = ctx.outputs(c.split, c.batch_size)
  metrics, curves = {}, {}
  for a, b in pairs_of(c, ctx.modalities):
    keep = present(outputs, (a, b))
    ea, eb = outputs["embeddings"][a][keep], outputs["embeddings"][b][keep]
    factors = outputs.get("factors")
    for q, t, name in ((ea, eb, f"{a}->{b}"), (eb, ea, f"{b}->{a}")):
      ranks = retrieval_lib.retrieval_ranks(q, t, mesh=ctx.mesh)
      for k, v in retrieval_lib.metrics_from_ranks(ranks, tuple(c.ks)).items():
        metrics[f"{name}/{k}"] = v
      if ctx.data.retrieval_ceiling is not None and factors is not None:
        query, target = name.split("->")
        metrics[f"{name}/R@1_ceiling"] = ctx.data.retrieval_ceiling(
            query, (target,), factors[keep])
      if c.plot_max_k:
        curves[name] = retrieval_lib.recall_at_k_curve(ranks, min(c.plot_max_k, len(ranks)))
  if curves and ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_recall_at_k(curves, ctx.plot_path("recall_at_k.png"),
                           title=f"Recall@K on {c.split} (step {ctx.step})")
  return metrics
