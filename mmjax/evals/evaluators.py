"""Evaluators chosen by name in `config.evals`, big_vision style.

`config.evals.<name>` holds `kind` (a registered evaluator; defaults to `<name>`),
`split`, `every` (steps; -1: the run's `eval_every_steps`) and the evaluator's own
fields. An evaluator is `fn(ctx, eval_config) -> {metric: float}`; the runner prefixes
`eval/<name>/`. `ctx` embeds a split once per evaluation round and shares it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import pipeline
from mmjax.data import world as world_lib
from mmjax.evals import retrieval as retrieval_lib

EVALUATORS: dict[str, Callable] = {}


def register(name: str):
  def wrap(fn):
    EVALUATORS[name] = fn
    return fn
  return wrap


@dataclasses.dataclass
class EvalContext:
  """What evaluators may use: the config, the model's outputs on a split, the workdir."""
  config: Any
  workdir: str
  mesh: Any
  params: Any
  apply_fn: Callable          # (params, global batch) -> ModelOutput
  featurize: Callable
  step: int
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def plot_dir(self) -> str:
    return os.path.join(self.workdir, "plots")

  def source(self, split: str):
    return pipeline.make_source(self.config.data, split)

  def outputs(self, split: str, batch_size: int) -> dict[str, Any]:
    """Model outputs on the whole split, as host numpy arrays (cached per split).

    Returns {'embeddings': {m: [N,D]}, 'features': {m: [N,F]}, 'logits': [N,C] or None,
    'mask': {m: bool [N]}, 'label': [N] or None, 'factors': [N,F] or None}.
    """
    key = (split, batch_size)
    if key not in self._cache:
      self._cache[key] = _embed_split(self, split, batch_size)
    return self._cache[key]


def _embed_split(ctx: EvalContext, split: str, batch_size: int) -> dict[str, Any]:
  try:
    source = ctx.source(split)
  except ValueError as e:
    raise ValueError(f"evaluation split {split!r}: {e}") from None
  num_data = ctx.mesh.shape["data"]
  if batch_size % num_data or batch_size % jax.process_count():
    raise ValueError(f"evals batch_size {batch_size} must be divisible by the {num_data} "
                     f"devices and {jax.process_count()} processes")
  pieces: list[dict] = []
  for local_batch, valid in pipeline.eval_batches(source, ctx.featurize,
                                                   global_batch_size=batch_size):
    batch = pipeline.to_global(local_batch, ctx.mesh)
    out = ctx.apply_fn(ctx.params, batch)
    host = {"embeddings": out.embeddings, "features": out.features, "logits": out.logits,
            "mask": batch["mask"], "label": batch.get("label"), "factors": batch.get("factors")}
    host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        host)
    pieces.append(jax.tree.map(lambda x: x[:valid], host))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


def build_evaluators(evals_config, default_every: int) -> dict[str, tuple[Callable, Any, int]]:
  """name -> (fn, config, every). Unknown names fail here, listing the valid ones."""
  out = {}
  for name, c in evals_config.items():
    kind = c.get("kind", name)
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}: unknown evaluator {kind!r}; valid: "
                       f"{sorted(EVALUATORS)}")
    every = c.get("every", -1)
    out[name] = (EVALUATORS[kind], c, default_every if every == -1 else every)
  return out


def run_evaluators(ctx: EvalContext, evaluators: Mapping[str, tuple], *, force: bool = False
                   ) -> dict[str, float]:
  """Runs the evaluators due at `ctx.step` (all of them with `force`)."""
  metrics = {}
  for name, (fn, c, every) in evaluators.items():
    if force or (every > 0 and ctx.step % every == 0):
      for k, v in fn(ctx, c).items():
        metrics[f"eval/{name}/{k}"] = float(v)
  return metrics


def _modalities_of(outputs, names, field: str):
  for m in names:
    if m not in outputs["embeddings"]:
      raise ValueError(f"{field}: the model produces no {m!r} embeddings; it has "
                       f"{sorted(outputs['embeddings'])}")
  return names


@register("retrieval")
def retrieval(ctx: EvalContext, c) -> dict[str, float]:
  """R@k, median and mean rank for every pair of modalities, both directions.

  Fields: `pairs` (list of [a, b]; default every pair of the model's modalities),
  `ks` (default (1, 5, 10)). On the procedural world it also logs the R@1 ceiling
  (`R@1_ceiling`): the expected R@1 of an oracle that knows exactly the factors
  both modalities express.
  """
  outputs = ctx.outputs(c.split, c.batch_size)
  names = sorted(outputs["embeddings"])
  pairs = [tuple(p) for p in c.get("pairs", ())] or list(itertools.combinations(names, 2))
  ks = tuple(c.get("ks", (1, 5, 10)))
  metrics = {}
  for a, b in pairs:
    _modalities_of(outputs, (a, b), f"config.evals retrieval pair {a, b}")
    ea, eb = outputs["embeddings"][a], outputs["embeddings"][b]
    ceiling = None
    if ctx.config.data.kind == "world" and outputs.get("factors") is not None:
      spec = world_lib.WorldSpec.from_config(ctx.config.data)
      ceiling = world_lib.oracle_recall_at_1(outputs["factors"],
                                             world_lib.shared_factors(spec, a, b))
    for q, t, name in ((ea, eb, f"{a}->{b}"), (eb, ea, f"{b}->{a}")):
      for k, v in retrieval_lib.retrieval_metrics(q, t, ks, mesh=ctx.mesh).items():
        metrics[f"{name}/{k}"] = v
      if ceiling is not None:
        metrics[f"{name}/R@1_ceiling"] = ceiling
  return metrics
