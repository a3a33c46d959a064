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

import itertools
from typing import Sequence

import numpy as np

from mmjax import align
from mmjax.data import world as world_lib
from mmjax.evals import evaluators
from mmjax.evals import retrieval as retrieval_lib

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


def default_joint(config, modalities: Sequence[str]) -> tuple[str, ...]:
  """The anchor against the rest (every modality against the rest without an
  anchor); nothing with fewer than three modalities."""
  names = sorted(modalities)
  if len(names) < 3:
    return ()
  anchor = config.objective.get("anchor")
  queries = [anchor] if anchor in names else names
  return tuple(f"{q}->{'+'.join(m for m in names if m != q)}" for q in queries)


def resolve_score(score: str, config) -> str:
  if score == "auto":
    return "volume" if "gram" in str(config.objective.kind).split("+") else "sum_cosine"
  if score not in SCORES:
    raise ValueError(f"joint retrieval score must be 'auto' or one of {SCORES}, got "
                     f"{score!r}")
  return score


def joint_ceiling(spec: world_lib.WorldSpec, query: str, targets: Sequence[str],
                  factors) -> float:
  """Expected R@1 of an oracle that sees the factors the query expresses and any of
  the targets expresses."""
  seen_by_targets = set(itertools.chain.from_iterable(
      spec.expresses.get(t, ()) for t in targets))
  used = [f for f in world_lib.FACTOR_NAMES
          if f in spec.expresses.get(query, ()) and f in seen_by_targets]
  return world_lib.oracle_recall_at_1(factors, used)


FIELDS = {"pairs": (), "ks": (1, 5, 10), "plot_max_k": 50, "joint": (), "score": "auto"}


@evaluators.register("joint_retrieval", FIELDS)
def joint_retrieval(ctx: evaluators.EvalContext, c) -> dict[str, float]:
  """Pairwise retrieval (as `retrieval`) plus joint queries.

  Fields: those of `retrieval` (`pairs`, `ks`, `plot_max_k`), `joint` (query specs
  such as 'text->image+audio'; empty: see `default_joint`), `score` ('auto',
  'volume', 'sum_cosine'). A joint query ranks only the samples where the query and
  every target modality are present.
  """
  metrics = evaluators.retrieval(ctx, c)
  outputs = ctx.outputs(c.split, c.batch_size)
  embeddings = outputs["embeddings"]
  joint = tuple(c.joint) or default_joint(ctx.config, embeddings)
  score = resolve_score(c.score, ctx.config)
  score_fn = _negative_volume if score == "volume" else "sum_cosine"
  world_spec = None
  if ctx.config.data.kind == "world" and outputs.get("factors") is not None:
    world_spec = world_lib.WorldSpec.from_config(ctx.config.data)
  for spec in joint:
    query, targets = parse_joint(spec, embeddings)
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
    if world_spec is not None:
      metrics[f"{name}/R@1_ceiling"] = joint_ceiling(world_spec, query, targets,
                                                     outputs["factors"][keep])
  return metrics
