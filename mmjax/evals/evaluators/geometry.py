"""The `geometry` evaluator: the shape of the embedding space."""

from __future__ import annotations

import numpy as np

from mmjax.evals import geometry as geometry_lib
from mmjax.evals.evaluators import EvalContext, pairs_of, register


@register("geometry")
def geometry(ctx: EvalContext, c) -> dict[str, float]:
  """The shape of the embedding space.

  Per pair a-b of modalities (rows where both are present): `a-b/modality_gap`
  (distance between the centroids of the unit embeddings), `a-b/alignment`
  (mean squared distance of pairs, Wang & Isola), `a-b/mutual_knn` (overlap of the
  k-NN sets, `k`), `a-b/linear_cka` (embeddings) and `a-b/linear_cka_features`
  (encoder features, before the heads). Per modality: `m/uniformity`. Uses the first
  `max_examples` rows of the split. With `plot`, writes plots/<name>_pca.png: a 2-D
  PCA of the embeddings coloured by modality.
  """
  outputs = ctx.outputs(c.split, c.batch_size)
  names = sorted(outputs["embeddings"])
  limit = slice(0, c.max_examples)
  emb = {m: e[limit] for m, e in outputs["embeddings"].items()}
  feats = {m: f[limit] for m, f in outputs["features"].items()}
  masks = {m: np.asarray(v[limit], bool) for m, v in outputs["mask"].items()}
  metrics = {}
  for m in names:
    if masks[m].sum() >= 2:
      metrics[f"{m}/uniformity"] = geometry_lib.uniformity(emb[m][masks[m]])
  for a, b in pairs_of(c, ctx.modalities):
    keep = masks[a] & masks[b]
    if keep.sum() < 2:
      raise ValueError(f"{ctx.where}: fewer than 2 rows of {c.split!r} have both {a!r} "
                       f"and {b!r} present")
    xa, xb = emb[a][keep], emb[b][keep]
    k = min(c.k, int(keep.sum()) - 1)
    metrics[f"{a}-{b}/modality_gap"] = geometry_lib.modality_gap(xa, xb)
    metrics[f"{a}-{b}/alignment"] = geometry_lib.alignment(xa, xb)
    metrics[f"{a}-{b}/mutual_knn"] = geometry_lib.mutual_knn_alignment(xa, xb, k)
    metrics[f"{a}-{b}/linear_cka"] = geometry_lib.linear_cka(xa, xb)
    metrics[f"{a}-{b}/linear_cka_features"] = geometry_lib.linear_cka(feats[a][keep],
                                                                      feats[b][keep])
  if c.plot and ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_embedding_pca({m: emb[m][masks[m]] for m in names},
                             ctx.plot_path("pca.png"),
                             title=f"Embeddings by modality, {c.split}, step {ctx.step}",
                             connect_pairs=20 if len(names) >= 2 and all(
                                 masks[m].all() for m in names[:2]) else 0)
  return metrics
