"""Joint retrieval: one modality queries tuples of the others (text -> (image, audio)).

The evaluator `joint_retrieval` is the `retrieval` evaluator plus joint queries.
Configured under the name `retrieval` (`config.evals.retrieval.kind =
'joint_retrieval'`) it logs the pairwise metrics and, for a query spec
'text->image+audio', `eval/retrieval/text->image+audio/R@1` (R@5, R@10, median
and mean rank, and on the procedural world the oracle ceiling `R@1_ceiling`).

Tuple j is scored against query i by
  'volume'      -vol(q_i, t_1j, .., t_Kj), the GRAM volume (smaller fits better);
  'sum_cosine'  sum_k cos(q_i, t_kj), what pairwise-trained models are built for.
'auto' picks 'volume' when the objective has a 'gram' term, else 'sum_cosine'.
Like `retrieval`, it ranks the samples whose modalities in the query are all present.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax import align
from mmjax.evals import retrieval as retrieval_lib
from mmjax.evals.evaluators import EvalContext, register
from mmjax.evals.evaluators.retrieval import retrieval

SCORES = ("volume", "sum_cosine")


def _negative_volume(query_block, target_tuples):
  # A module-level function: the rank program is compiled once per score function.
  return -align.gram_volume(query_block, list(target_tuples))


def parse_joint(spec: str, modalities: Sequence[str]) -> tuple[str, tuple[str, ...]]:
  """'text->image+audio' -> ('text', ('image', 'audio')), checked against `modalities`."""
  where = f"joint retrieval query {spec!r}"
  if not isinstance(spec, str) or spec.count("->") != 1:
    raise ValueError(f"{where}: write it as 'query->target+target', e.g. "
                     "'text->image+audio'")
  query, targets = spec.split("->")
  targets = tuple(targets.split("+"))
  for m in (query, *targets):
    if m not in modalities:
      raise ValueError(f"{where}: the model produces no {m!r} embeddings; it has "
                       f"{sorted(modalities)}")
  if query in targets or len(set(targets)) != len(targets):
    raise ValueError(f"{where}: the query and the targets must be distinct modalities")
  return query, targets


def default_joint(anchor: str | None, modalities: Sequence[str]) -> tuple[str, ...]:
  """The anchor against the rest (every modality against the rest without an
  anchor); nothing with fewer than three modalities."""
  names = sorted(modalities)
  if len(names) < 3:
    return ()
  queries = [anchor] if anchor in names else names
  return tuple(f"{q}->{'+'.join(m for m in names if m != q)}" for q in queries)


def resolve_score(score: str, objective: str) -> str:
  """'auto' -> 'volume' when the objective kind has a 'gram' term, else 'sum_cosine'."""
  if score == "auto":
    return "volume" if "gram" in str(objective).split("+") else "sum_cosine"
  if score not in SCORES:
    raise ValueError(f"joint retrieval score must be 'auto' or one of {SCORES}, got "
                     f"{score!r}")
  return score


def _check(c, data, where):
  del data
  resolve_score(c.score, "")


@register("joint_retrieval", check=_check)
def joint_retrieval(ctx: EvalContext, c) -> dict[str, float]:
  """Pairwise retrieval (as `retrieval`) plus joint queries.

  Fields: those of `retrieval` (`pairs`, `ks`, `plot_max_k`), `joint` (query specs
  such as 'text->image+audio'; empty: see `default_joint`), `score` ('auto',
  'volume', 'sum_cosine'). A joint query ranks only the samples where the query and
  every target modality are present.
  """
  metrics = retrieval(ctx, c)
  outputs = ctx.outputs(c.split, c.batch_size)
  embeddings = outputs["embeddings"]
  joint = tuple(c.joint) or default_joint(ctx.anchor, ctx.modalities)
  score = resolve_score(c.score, ctx.objective)
  score_fn = _negative_volume if score == "volume" else "sum_cosine"
  factors = outputs.get("factors")
  for spec in joint:
    query, targets = parse_joint(spec, ctx.modalities)
    name = f"{query}->{'+'.join(targets)}"
    keep = np.all([np.asarray(outputs["mask"][m], bool) for m in (query, *targets)],
                  axis=0)
    if not keep.any():
      raise ValueError(f"joint retrieval {spec!r}: no sample of split {c.split!r} has "
                       f"{query!r} and {list(targets)} all present")
    for k, v in retrieval_lib.joint_retrieval_metrics(
        embeddings[query][keep], [embeddings[t][keep] for t in targets], tuple(c.ks),
        score=score_fn, mesh=ctx.mesh).items():
      metrics[f"{name}/{k}"] = v
    if ctx.data.retrieval_ceiling is not None and factors is not None:
      metrics[f"{name}/R@1_ceiling"] = ctx.data.retrieval_ceiling(query, targets,
                                                                  factors[keep])
  return metrics
