"""Retrieval where a query has several relevant targets, given by groups.

Query q and target t are relevant to each other when `query_groups[q] ==
target_groups[t]`. Two protocols use it:

  * several captions per image (COCO's five; CLIP's and open_clip's evaluation):
    image->text has the image's index as its group and each caption its image's index,
    so an image is a hit at K when ANY of its captions is in the top K; text->image
    ranks the one image of each caption.
  * class-level retrieval: the groups are labels, and every target of the query's
    class is relevant.

The rank of a query is the position of its first relevant target when ties are
broken against it (the rule of `mmjax.evals.retrieval`, one relevant target being the
special case): `1 + #{irrelevant t : s_qt >= max over relevant t' of s_qt'}`. Tied
relevant targets do not count against each other. R@K is the fraction of queries with
rank <= K. With `precision=True` the targets of each query are sorted by score,
irrelevant ones first among equal scores (the same pessimistic rule), for precision@K
(relevant targets in the top K, / K) and average precision (the mean, over the
query's relevant targets, of the precision at each one's position; mAP is its mean
over queries). Exact and blocked over queries as `retrieval_ranks`, with the same
`mesh` and `block_size`.
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax.numpy as jnp
import numpy as np

from mmjax.evals import retrieval as retrieval_lib


def _block_stats(query_block, query_groups, target_groups, target_tuples, score_fn, ks):
  """Rank, average precision and hits in the top k (for each k of `ks`) of one block;
  the rank is -1 for a query with a NaN score, 0 for one without a relevant target."""
  scores = retrieval_lib.block_scores(query_block, target_tuples, score_fn)
  relevant = (query_groups[:, None] == target_groups[None, :]).astype(jnp.int32)
  # Score descending; among equal scores the irrelevant targets first.
  order = jnp.lexsort((relevant, -scores), axis=-1)
  hits = jnp.take_along_axis(relevant, order, axis=1)
  found = jnp.cumsum(hits, axis=1)
  positions = jnp.arange(1, scores.shape[1] + 1, dtype=jnp.float32)
  num_relevant = found[:, -1]
  # The first relevant position of this order is the pessimistic rank.
  rank = jnp.where(num_relevant > 0, jnp.argmax(hits, axis=1) + 1, 0).astype(jnp.int32)
  return {"rank": jnp.where(jnp.any(jnp.isnan(scores), axis=1), -1, rank),
          "ap": jnp.sum(hits * found / positions, axis=1) / jnp.maximum(num_relevant, 1),
          "hits": jnp.stack([found[:, k - 1] for k in ks], axis=1)}


def _as_groups(groups, n: int, name: str, where: str) -> np.ndarray:
  groups = np.asarray(groups)
  if groups.ndim != 1 or groups.shape[0] != n:
    raise ValueError(f"{where}: `{name}` must have shape [{n}], got {groups.shape}.")
  if not np.issubdtype(groups.dtype, np.integer):
    raise ValueError(f"{where}: `{name}` must be integer ids, got dtype {groups.dtype}.")
  if n and groups.min() < 0:
    raise ValueError(f"{where}: `{name}` has a negative id {groups.min()}.")
  if n and groups.max() >= 2**31:
    raise ValueError(f"{where}: `{name}` has an id {groups.max()} beyond int32.")
  return groups.astype(np.int32)


def _run(queries, targets, query_groups, target_groups, ks, *, precision, normalize,
         mesh, block_size, where):
  queries = retrieval_lib.as_float_matrix(queries, "queries", where)
  targets = retrieval_lib.as_float_matrix(targets, "targets", where)
  if queries.shape[1] != targets.shape[1]:
    raise ValueError(f"{where}: `targets` have D={targets.shape[1]} but `queries` have "
                     f"D={queries.shape[1]}; both must live in the same embedding space.")
  groups = (_as_groups(query_groups, queries.shape[0], "query_groups", where),
            _as_groups(target_groups, targets.shape[0], "target_groups", where))
  if normalize:
    queries = retrieval_lib.l2_normalize_rows(queries, "queries", where)
    targets = retrieval_lib.l2_normalize_rows(targets, "targets", where)
  stats = dict(block_fn=_block_stats, ks=ks) if precision else {}
  return retrieval_lib._blocked_ranks(queries, [targets], retrieval_lib._sum_cosine_score,
                                      mesh, block_size, where, groups=groups, **stats)


def grouped_ranks(queries, targets, query_groups, target_groups, *,
                  normalize: bool = True, mesh=None, block_size: int = 1024
                  ) -> np.ndarray:
  """int64 [Nq]: for each query, the pessimistic rank of its first relevant target.

  Args:
    queries: [Nq, D]; targets: [Nt, D].
    query_groups: int [Nq]; target_groups: int [Nt]; ids >= 0; a query and a target
      are relevant to each other when their ids are equal. Every query needs at least
      one relevant target.
    normalize, mesh, block_size: as in `retrieval.retrieval_ranks`.
  """
  return _run(queries, targets, query_groups, target_groups, None, precision=False,
              normalize=normalize, mesh=mesh, block_size=block_size,
              where="grouped_ranks")["rank"]


def grouped_stats(queries, targets, query_groups, target_groups,
                  ks: Sequence[int] = (1, 5, 10), *, normalize: bool = True, mesh=None,
                  block_size: int = 1024) -> Dict[str, np.ndarray]:
  """Per query, by the sorted targets (arguments as `grouped_ranks`, each k <= Nt):
  {'rank': int64 [Nq], 'ap': float [Nq] (average precision), 'hits': int [Nq, len(ks)]
  (relevant targets in the top k)}."""
  where = "grouped_stats"
  if np.ndim(targets) == 2:
    ks = retrieval_lib._check_ks(ks, np.shape(targets)[0], where)
  return _run(queries, targets, query_groups, target_groups, ks, precision=True,
              normalize=normalize, mesh=mesh, block_size=block_size, where=where)


def stats_metrics(stats: Dict[str, np.ndarray], ks: Sequence[int],
                  num_targets: int) -> Dict[str, float]:
  """`grouped_stats` -> {'R@k', 'median_rank', 'mean_rank', 'P@k', 'mAP'}."""
  ks = retrieval_lib._check_ks(ks, num_targets, "stats_metrics")
  metrics = retrieval_lib.metrics_from_ranks(stats["rank"], ks, num_targets=num_targets)
  for j, k in enumerate(ks):
    metrics[f"P@{k}"] = float(np.mean(stats["hits"][:, j] / k))
  metrics["mAP"] = float(np.mean(stats["ap"]))
  return metrics


def grouped_retrieval_metrics(queries, targets, query_groups, target_groups,
                              ks: Sequence[int] = (1, 5, 10), *, precision: bool = False,
                              normalize: bool = True, mesh=None, block_size: int = 1024
                              ) -> Dict[str, float]:
  """{'R@k' (a relevant target in the top k), 'median_rank', 'mean_rank'} and, with
  `precision`, {'P@k', 'mAP'}; arguments as `grouped_ranks`, each k <= Nt."""
  num_targets = np.shape(targets)[0] if np.ndim(targets) == 2 else None
  if precision:
    stats = grouped_stats(queries, targets, query_groups, target_groups, ks,
                          normalize=normalize, mesh=mesh, block_size=block_size)
    return stats_metrics(stats, ks, num_targets)
  if num_targets:
    retrieval_lib._check_ks(ks, num_targets, "grouped_retrieval_metrics")
  ranks = grouped_ranks(queries, targets, query_groups, target_groups,
                        normalize=normalize, mesh=mesh, block_size=block_size)
  return retrieval_lib.metrics_from_ranks(ranks, ks, num_targets=num_targets)


def caption_groups(counts: Sequence[int]) -> np.ndarray:
  """int [sum(counts)]: the owner of each caption when item i has counts[i] of them,
  in order (`[2, 1, 3] -> [0, 0, 1, 2, 2, 2]`)."""
  counts = np.asarray(counts, np.int64)
  return np.repeat(np.arange(len(counts)), counts)
