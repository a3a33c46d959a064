"""Evaluators chosen by name in `config.evals`, big_vision style.

`config.evals.<name>` holds `kind` (a registered evaluator; defaults to `<name>`),
`split`, `every`, `batch_size` and the evaluator's own fields:

  every  > 0: every that many steps and at the end of the run;
         -1: every `config.eval_every_steps` steps and at the end;
          0: only at the end of the run (and in `--mode=eval`).

An evaluator is `fn(ctx, eval_config) -> {metric: float}`; the runner prefixes
`eval/<name>/`. `ctx` (an `EvalContext`) embeds a split once per evaluation round and
shares it between evaluators, knows the evaluator's name (`ctx.name`) for plot file
names, and collects markdown sections for `summary.md` (`ctx.add_report`).

Registered here: `retrieval`, `zero_shot`, `linear_probe`, `knn`, `calibration`,
`geometry`. `evaluator_config(kind, **fields)` returns a complete, locked config entry
(every field with its default), so a typo in a field is an error in a config file and
on the command line; `build_evaluators` checks the names, fields, splits and modalities
of every entry before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import pipeline
from mmjax.data import world as world_lib
from mmjax.evals import calibration as calibration_lib
from mmjax.evals import classification as classification_lib
from mmjax.evals import geometry as geometry_lib
from mmjax.evals import retrieval as retrieval_lib

EVALUATORS: dict[str, Callable] = {}
# kind -> its own fields and their defaults; None: the evaluator's fields are not checked.
EVALUATOR_FIELDS: dict[str, dict[str, Any] | None] = {}
# Fields every evaluator has.
COMMON_FIELDS = {"kind": "", "split": "test", "every": -1, "batch_size": 256}
# Modules beside this one whose evaluators register themselves when imported; they are
# imported (when present) before a name is looked up.
EVALUATOR_MODULES = ("mmjax.evals.robustness", "mmjax.evals.joint_retrieval")

# Prompt templates for the procedural world, in the style of its captions
# ("a small red circle at the top left", "large blue square, centre").
WORLD_PROMPT_TEMPLATES = ("a {}", "{}", "there is a {}", "one {}")
# Word order of a world class name: adjectives, the noun, then where it is.
_WORLD_NAME_ORDER = ("size", "colour", "shape")


def register(name: str, fields: Mapping[str, Any] | None = None):
  """Registers `fn(ctx, eval_config) -> metrics` as evaluator kind `name`.

  Args:
    name: the kind, as written in `config.evals.<x>.kind` (or as `<x>` itself).
    fields: the evaluator's own config fields and their defaults. With it, a field
      outside `COMMON_FIELDS` and `fields` is an error naming it, and absent fields
      take their defaults; None leaves the evaluator's config unchecked.
  """
  def wrap(fn):
    EVALUATORS[name] = fn
    EVALUATOR_FIELDS[name] = None if fields is None else dict(fields)
    return fn
  return wrap


def _import_evaluator_modules() -> None:
  for module in EVALUATOR_MODULES:
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module)


def _kind_or_error(kind: str, where: str) -> str:
  _import_evaluator_modules()
  if kind not in EVALUATORS:
    raise ValueError(f"{where}: unknown evaluator {kind!r}; valid: {sorted(EVALUATORS)}")
  return kind


def evaluator_config(kind: str, **fields) -> ml_collections.ConfigDict:
  """A complete `config.evals.<name>` entry: common fields, the evaluator's own
  defaults, then `fields`. Returned locked, so a misspelt field is an error.

  Example: `c.evals.zero_shot = evaluator_config('zero_shot', every=0)`.
  """
  _kind_or_error(kind, "evaluator_config")
  entry = dict(COMMON_FIELDS, kind=kind)
  entry.update(EVALUATOR_FIELDS[kind] or {})
  unknown = sorted(set(fields) - set(entry)) if EVALUATOR_FIELDS[kind] is not None else []
  if unknown:
    raise ValueError(f"evaluator_config({kind!r}): unknown fields {unknown}; valid: "
                     f"{sorted(entry)}")
  entry.update(fields)
  c = ml_collections.ConfigDict(entry)
  c.lock()
  return c


@dataclasses.dataclass
class EvalContext:
  """What evaluators may use: the config, the model's outputs on a split, the workdir.

  `reports` (title -> markdown) and the output cache are shared by every evaluator of
  a round; `name` is the running evaluator's name in `config.evals`.
  """
  config: Any
  workdir: str
  mesh: Any
  params: Any
  apply_fn: Callable          # (params, global batch) -> ModelOutput
  featurize: Callable
  step: int
  name: str = ""
  reports: dict = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def plot_dir(self) -> str:
    return os.path.join(self.workdir, "plots")

  @property
  def writes_files(self) -> bool:
    """Only process 0 writes plots and reports."""
    return jax.process_index() == 0

  def plot_path(self, filename: str) -> str:
    """WORKDIR/plots/<evaluator name>_<filename>."""
    return os.path.join(self.plot_dir, f"{self.name}_{filename}" if self.name else filename)

  def add_report(self, title: str, markdown: str) -> None:
    """A section `## title` with `markdown` in summary.md (the latest round's wins)."""
    if not isinstance(title, str) or not title.strip():
      raise ValueError(f"add_report: `title` must be a non-empty string, got {title!r}")
    self.reports[title] = str(markdown)

  def source(self, split: str):
    try:
      return pipeline.make_source(self.config.data, split)
    except ValueError as e:
      raise ValueError(f"evaluation split {split!r}: {e}") from None

  def outputs(self, split: str, batch_size: int, max_examples: int | None = None
              ) -> dict[str, Any]:
    """Model outputs on the split (its first `max_examples`), as host numpy arrays,
    cached per round.

    Returns {'embeddings': {m: [N,D]}, 'features': {m: [N,F]}, 'logits': [N,C] or None,
    'mask': {m: bool [N]}, 'label': [N] or None, 'factors': [N,F] or None,
    'logit_scale': float}.
    """
    key = ("split", split, batch_size, max_examples)
    if key not in self._cache:
      self._cache[key] = _embed_split(self, split, batch_size, max_examples)
    return self._cache[key]

  def embed_texts(self, texts: Sequence[str], batch_size: int, *,
                  modality: str = "text") -> np.ndarray:
    """Embeddings [len(texts), D] of `texts` through the `modality` tower.

    The texts are tokenised like the data (`featurize.tokenizer`); every other
    modality is zero-filled and marked absent in the batch's mask.
    """
    if modality not in self.model_modalities:
      raise ValueError(f"the model has no {modality!r} tower to embed texts; it has "
                       f"{list(self.model_modalities)}")
    blank = self._blank_example()
    rows = []
    for t in texts:
      row = {m: np.zeros_like(v) for m, v in blank.items() if m != "mask"}
      row[modality] = self.featurize.tokenizer.encode(t)
      row["mask"] = {m: np.bool_(m == modality) for m in blank["mask"]}
      rows.append(row)
    return _apply_rows(self, rows, batch_size)["embeddings"][modality]

  @property
  def model_modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.config.model.encoders.keys()))

  def _blank_example(self) -> dict:
    if "blank" not in self._cache:
      # Only the shapes matter; every run has a train split.
      example = self.featurize((0, self.source("train")[0]))
      self._cache["blank"] = {m: example[m] for m in self.model_modalities} | {
          "mask": example["mask"]}
    return self._cache["blank"]


class _Head:
  """The first `n` examples of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def _check_batch_size(ctx: EvalContext, batch_size: int) -> None:
  num_data = ctx.mesh.shape["data"]
  if batch_size % num_data or batch_size % jax.process_count():
    raise ValueError(f"evals batch_size {batch_size} must be divisible by the {num_data} "
                     f"devices and {jax.process_count()} processes")


def _gather(host):
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      host)


def _embed_split(ctx: EvalContext, split: str, batch_size: int,
                 max_examples: int | None) -> dict[str, Any]:
  source = ctx.source(split)
  if max_examples is not None:
    source = _Head(source, max_examples)
  _check_batch_size(ctx, batch_size)
  pieces: list[dict] = []
  logit_scale = None
  for local_batch, valid in pipeline.eval_batches(source, ctx.featurize,
                                                   global_batch_size=batch_size):
    batch = pipeline.to_global(local_batch, ctx.mesh)
    out = ctx.apply_fn(ctx.params, batch)
    host = _gather({"embeddings": out.embeddings, "features": out.features,
                    "logits": out.logits, "mask": batch["mask"],
                    "label": batch.get("label"), "factors": batch.get("factors")})
    logit_scale = float(out.logit_scale)
    pieces.append(jax.tree.map(lambda x: x[:valid], host))
  outputs = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
  outputs["logit_scale"] = logit_scale
  return outputs


def _apply_rows(ctx: EvalContext, rows: list[dict], batch_size: int) -> dict[str, Any]:
  """Model outputs of featurized `rows` (same on every process), as host numpy."""
  _check_batch_size(ctx, batch_size)
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local
  pieces = []
  for start in range(0, len(rows), batch_size):
    valid = min(batch_size, len(rows) - start)
    chunk = [rows[min(start + i, len(rows) - 1)] for i in range(lo, lo + local)]
    local_batch = jax.tree.map(lambda *xs: np.stack(xs), *chunk)
    out = ctx.apply_fn(ctx.params, pipeline.to_global(local_batch, ctx.mesh))
    host = _gather({"embeddings": out.embeddings, "logits": out.logits})
    pieces.append(jax.tree.map(lambda x: x[:valid], host))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


# ---------------------------------------------------------------------------------------
# Building and running.
# ---------------------------------------------------------------------------------------


def _splits(data_config) -> tuple[str, ...]:
  """The splits the configured data has (world: `data.sizes`; tfds: `data.splits`)."""
  if data_config.kind == "world":
    return tuple(data_config.sizes.keys())
  splits = data_config.get("splits")
  return tuple(splits.keys()) if hasattr(splits, "keys") else tuple(splits or ())


def _field_modalities(field: str, value) -> list[str]:
  if field in ("modality", "text_modality"):
    return [value] if value else []
  if field == "modalities":
    return list(value)
  if field == "pairs":
    return [m for pair in value for m in pair]
  return []


def _check_entry(name: str, c, config) -> None:
  """Splits the data lacks and modalities the model does not produce, named."""
  where = f"config.evals.{name}"
  splits = _splits(config.data)
  if splits:
    for field in ("split", "train_split", "val_split"):
      if field in c and c[field] not in splits:
        raise ValueError(f"{where}.{field}: the data ({config.data.kind}) has no split "
                         f"{c[field]!r}; it has {list(splits)}")
  produced = tuple(sorted(config.model.encoders.keys()))
  for field in ("modality", "text_modality", "modalities", "pairs"):
    if field in c:
      for m in _field_modalities(field, c[field]):
        if m not in produced:
          raise ValueError(f"{where}.{field}: the model produces no {m!r} embeddings; "
                           f"it has {list(produced)}")
  if "pairs" in c:
    for pair in c.pairs:
      if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"{where}.pairs: each pair names two different modalities, "
                         f"got {list(pair)}")


def build_evaluators(evals_config, default_every: int, *, config=None,
                     only: Sequence[str] | None = None
                     ) -> dict[str, tuple[Callable, Any, int]]:
  """name -> (fn, config with defaults filled in, every).

  Unknown kinds fail here, listing the valid ones; so do unknown fields of a
  registered evaluator. With the whole `config`, splits the data lacks and
  modalities the model does not produce are errors too. `only` keeps the named
  entries of `evals_config` (an unknown name is an error listing the configured ones).
  """
  names = list(evals_config.keys())
  if only is not None:
    missing = [n for n in only if n not in names]
    if missing:
      raise ValueError(f"--evals: no evaluator named {missing} in config.evals; "
                       f"configured: {names}")
    names = [n for n in names if n in only]
  out = {}
  for name in names:
    c = evals_config[name]
    where = f"config.evals.{name}"
    kind = _kind_or_error(c.get("kind") or name, where)
    entry = dict(COMMON_FIELDS, kind=kind)
    own = EVALUATOR_FIELDS[kind]
    if own is not None:
      entry.update(own)
      unknown = sorted(set(c.keys()) - set(entry))
      if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} for evaluator {kind!r}; "
                         f"valid: {sorted(entry)}")
    entry.update({k: c[k] for k in c.keys()})
    entry["kind"] = kind
    full = ml_collections.ConfigDict(entry)
    if config is not None:
      _check_entry(name, full, config)
    every = full.every
    out[name] = (EVALUATORS[kind], full, default_every if every == -1 else every)
  return out


def run_evaluators(ctx: EvalContext, evaluators: Mapping[str, tuple], *, force: bool = False
                   ) -> dict[str, float]:
  """Runs the evaluators due at `ctx.step` (all of them with `force`)."""
  metrics = {}
  for name, (fn, c, every) in evaluators.items():
    if force or (every > 0 and ctx.step % every == 0):
      for k, v in fn(dataclasses.replace(ctx, name=name), c).items():
        metrics[f"eval/{name}/{k}"] = float(v)
  return metrics


# ---------------------------------------------------------------------------------------
# Helpers shared by evaluators.
# ---------------------------------------------------------------------------------------


def _modalities_of(outputs, names, field: str):
  for m in names:
    if m not in outputs["embeddings"]:
      raise ValueError(f"{field}: the model produces no {m!r} embeddings; it has "
                       f"{sorted(outputs['embeddings'])}")
  return names


def _present(outputs, modalities) -> np.ndarray:
  """bool [N]: rows where every one of `modalities` is present."""
  keep = np.ones(outputs["mask"][modalities[0]].shape[0], bool)
  for m in modalities:
    keep &= outputs["mask"][m].astype(bool)
  return keep


def _labels(outputs, where: str) -> np.ndarray:
  if outputs.get("label") is None:
    raise ValueError(f"{where}: the data has no 'label'; classification evaluators need one")
  return outputs["label"].astype(np.int64)


def _num_classes(config, labels_seen: Sequence[np.ndarray]) -> int:
  if config.data.kind == "world":
    return world_lib.WorldSpec.from_config(config.data).num_classes
  num = config.data.get("num_classes")
  return int(num) if num else int(max(int(y.max()) for y in labels_seen)) + 1


def _representation(outputs, c, m: str, where: str) -> np.ndarray:
  if c.representation not in ("embeddings", "features"):
    raise ValueError(f"{where}.representation must be 'embeddings' or 'features', got "
                     f"{c.representation!r}")
  return outputs[c.representation][m]


def _modalities_field(c, outputs, where: str) -> list[str]:
  names = list(c.modalities) or sorted(outputs["embeddings"])
  return _modalities_of(outputs, names, f"{where}.modalities")


def world_class_names(data_config) -> list[str]:
  """Names of the world's label classes, in label order ('small red circle', ...).

  A class of label factors (f1, ..., fk) is named by their canonical words: size,
  colour, then the shape (or 'shape' when the label has none), then 'at the
  <position>'. Only `data.label.mode == 'product'` labels have names.
  """
  spec = world_lib.WorldSpec.from_config(data_config)
  if spec.label_mode != "product":
    raise ValueError(f"data.label.mode {spec.label_mode!r}: these classes have no names; "
                     "give the evaluator `class_names`")
  names = []
  for values in itertools.product(*(world_lib.FACTORS[f] for f in spec.label_factors)):
    chosen = dict(zip(spec.label_factors, values))
    words = [chosen[f] for f in _WORLD_NAME_ORDER[:2] if f in chosen]
    words.append(chosen.get("shape", "shape"))
    if "position" in chosen:
      words.append(f"at the {chosen['position']}")
    names.append(" ".join(words))
  return names


def _with_article(prompt: str) -> str:
  # The captions say "an" before a vowel; prompts should read the same.
  return re.sub(r"(^|\s)a ([aeiou])", r"\1an \2", prompt)


def _zero_shot_classes(ctx: EvalContext, c, where: str) -> tuple[list[str], np.ndarray]:
  """(class names, class embeddings [C, D]) for `c`, cached per round."""
  if c.class_names:
    names = list(c.class_names)
  elif ctx.config.data.kind == "world":
    names = world_class_names(ctx.config.data)
  else:
    raise ValueError(f"{where}.class_names: the data ({ctx.config.data.kind}) has no "
                     "class names; list them in the evaluator's config")
  if c.templates:
    templates = list(c.templates)
  elif ctx.config.data.kind == "world":
    templates = list(WORLD_PROMPT_TEMPLATES)
  else:
    templates = list(classification_lib.DEFAULT_PROMPT_TEMPLATES)
  key = ("zero_shot", c.text_modality, tuple(names), tuple(templates), c.batch_size)
  if key not in ctx._cache:
    classification_lib._check_templates(templates, f"{where}.templates")
    prompts = [_with_article(t.format(n)) for n in names for t in templates]
    emb = ctx.embed_texts(prompts, c.batch_size, modality=c.text_modality)
    emb = emb.reshape(len(names), len(templates), -1)
    ctx._cache[key] = (names, classification_lib.zero_shot_classifier(emb))
  return ctx._cache[key]


def _zero_shot_logits(ctx: EvalContext, c, where: str):
  """(logits [N, C] = logit_scale * cosine, labels [N], class names) on `c.split`,
  rows where `c.modality` is present."""
  outputs = ctx.outputs(c.split, c.batch_size)
  _modalities_of(outputs, (c.modality,), f"{where}.modality")
  _modalities_of(outputs, (c.text_modality,), f"{where}.text_modality")
  labels = _labels(outputs, where)
  names, classes = _zero_shot_classes(ctx, c, where)
  keep = _present(outputs, (c.modality,))
  x = outputs["embeddings"][c.modality][keep].astype(np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  if labels.max() >= len(names):
    raise ValueError(f"{where}.class_names: {len(names)} names but the split has label "
                     f"{int(labels.max())}")
  return outputs["logit_scale"] * (x @ classes.T), labels[keep], names


def _metric_name(name: str) -> str:
  return name.replace(" ", "_")


# ---------------------------------------------------------------------------------------
# Evaluators.
# ---------------------------------------------------------------------------------------


@register("retrieval", {"pairs": (), "ks": (1, 5, 10), "plot_max_k": 50})
def retrieval(ctx: EvalContext, c) -> dict[str, float]:
  """R@k, median and mean rank for every pair of modalities, both directions.

  Fields: `pairs` (list of [a, b]; default every pair of the model's modalities),
  `ks` (default (1, 5, 10)), `plot_max_k` (the recall@K curve plot goes up to this K,
  capped at N; 0: no plot). Only rows where both modalities are present take part.
  On the procedural world it also logs the R@1 ceiling (`R@1_ceiling`): the expected
  R@1 of an oracle that knows exactly the factors both modalities express.
  """
  outputs = ctx.outputs(c.split, c.batch_size)
  names = sorted(outputs["embeddings"])
  pairs = [tuple(p) for p in c.pairs] or list(itertools.combinations(names, 2))
  ks = tuple(c.ks)
  metrics, curves = {}, {}
  for a, b in pairs:
    _modalities_of(outputs, (a, b), f"config.evals.{ctx.name}.pairs {[a, b]}")
    keep = _present(outputs, (a, b))
    ea, eb = outputs["embeddings"][a][keep], outputs["embeddings"][b][keep]
    ceiling = None
    if ctx.config.data.kind == "world" and outputs.get("factors") is not None:
      spec = world_lib.WorldSpec.from_config(ctx.config.data)
      ceiling = world_lib.oracle_recall_at_1(outputs["factors"][keep],
                                             world_lib.shared_factors(spec, a, b))
    for q, t, name in ((ea, eb, f"{a}->{b}"), (eb, ea, f"{b}->{a}")):
      ranks = retrieval_lib.retrieval_ranks(q, t, mesh=ctx.mesh)
      for k, v in retrieval_lib.metrics_from_ranks(ranks, ks).items():
        metrics[f"{name}/{k}"] = v
      if ceiling is not None:
        metrics[f"{name}/R@1_ceiling"] = ceiling
      if c.plot_max_k:
        curves[name] = retrieval_lib.recall_at_k_curve(ranks, min(c.plot_max_k, len(ranks)))
  if curves and ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_recall_at_k(curves, ctx.plot_path("recall_at_k.png"),
                           title=f"Recall@K on {c.split} (step {ctx.step})")
  return metrics


_ZERO_SHOT_FIELDS = {"modality": "image", "text_modality": "text", "templates": (),
                     "class_names": ()}


@register("zero_shot", _ZERO_SHOT_FIELDS)
def zero_shot(ctx: EvalContext, c) -> dict[str, float]:
  """Zero-shot classification: class names through prompt templates into the text tower.

  Each class is the normalised mean of its prompts' text embeddings; a sample of
  `modality` takes the class of highest cosine. Fields: `modality` (default 'image'),
  `text_modality` ('text'), `templates` (format strings with one '{}'; default
  `WORLD_PROMPT_TEMPLATES` on the world, CLIP-style ones otherwise), `class_names`
  (default: the world's label classes, see `world_class_names`).

  Metrics: `accuracy`, `mean_per_class_accuracy`, `chance` (1 / classes) and
  `per_class/<class name>` (spaces become '_'; classes without samples are left out).
  """
  where = f"config.evals.{ctx.name}"
  logits, labels, names = _zero_shot_logits(ctx, c, where)
  result = classification_lib._accuracy_summary(np.argmax(logits, axis=1), labels,
                                                len(names))
  metrics = {"accuracy": result["accuracy"],
             "mean_per_class_accuracy": result["mean_per_class_accuracy"],
             "chance": 1.0 / len(names)}
  for name, acc in zip(names, result["per_class_accuracy"]):
    if np.isfinite(acc):
      metrics[f"per_class/{_metric_name(name)}"] = float(acc)
  return metrics


_PROBE_FIELDS = {"modalities": (), "representation": "embeddings", "train_split": "train",
                 "train_examples": 2048}


@register("linear_probe", dict(_PROBE_FIELDS, val_split="validation",
                               l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), steps=500))
def linear_probe(ctx: EvalContext, c) -> dict[str, float]:
  """L2-regularised logistic regression on frozen embeddings, per modality.

  Fits on the first `train_examples` of `train_split`, picks the l2 of `l2_grid`
  with the best accuracy on `val_split`, reports accuracy on `split`
  (see `classification.linear_probe`). Fields: `modalities` (default all),
  `representation` ('embeddings', or 'features' before the projection head).

  Metrics per modality m: `m/accuracy` (test), `m/val_accuracy`, `m/l2`; and `chance`.
  """
  where = f"config.evals.{ctx.name}"
  train = ctx.outputs(c.train_split, c.batch_size, c.train_examples)
  val = ctx.outputs(c.val_split, c.batch_size)
  test = ctx.outputs(c.split, c.batch_size)
  labels = [_labels(o, where) for o in (train, val, test)]
  num_classes = _num_classes(ctx.config, labels)
  metrics = {"chance": 1.0 / num_classes}
  for m in _modalities_field(c, test, where):
    parts = []
    for o, y in zip((train, val, test), labels):
      keep = _present(o, (m,))
      parts += [_representation(o, c, m, where)[keep], y[keep]]
    result = classification_lib.linear_probe(*parts, l2_grid=tuple(c.l2_grid),
                                             steps=c.steps, num_classes=num_classes)
    metrics[f"{m}/accuracy"] = result["test_accuracy"]
    metrics[f"{m}/val_accuracy"] = result["val_accuracy"]
    metrics[f"{m}/l2"] = result["l2"]
  return metrics


@register("knn", dict(_PROBE_FIELDS, k=20, temperature=0.07))
def knn(ctx: EvalContext, c) -> dict[str, float]:
  """Cosine k-NN vote over the first `train_examples` of `train_split`, per modality.

  Fields: `modalities` (default all), `representation` ('embeddings' | 'features'),
  `k`, `temperature` (vote weight exp(cos / t); 0 for an unweighted vote).
  Metrics per modality m: `m/accuracy`, `m/mean_per_class_accuracy`; and `chance`.
  """
  where = f"config.evals.{ctx.name}"
  train = ctx.outputs(c.train_split, c.batch_size, c.train_examples)
  test = ctx.outputs(c.split, c.batch_size)
  labels = [_labels(o, where) for o in (train, test)]
  num_classes = _num_classes(ctx.config, labels)
  metrics = {"chance": 1.0 / num_classes}
  for m in _modalities_field(c, test, where):
    parts = []
    for o, y in zip((train, test), labels):
      keep = _present(o, (m,))
      parts += [_representation(o, c, m, where)[keep], y[keep]]
    result = classification_lib.knn_classify(*parts, k=c.k,
                                             temperature=c.temperature or None,
                                             num_classes=num_classes)
    metrics[f"{m}/accuracy"] = result["accuracy"]
    metrics[f"{m}/mean_per_class_accuracy"] = result["mean_per_class_accuracy"]
  return metrics


@register("calibration", dict(_ZERO_SHOT_FIELDS, logits="zero_shot", n_bins=15))
def calibration(ctx: EvalContext, c) -> dict[str, float]:
  """Expected calibration error and a reliability diagram of a classifier's output.

  Fields: `logits` — 'zero_shot' (logit_scale * cosine to the zero-shot class
  embeddings; the zero-shot fields `modality`, `text_modality`, `templates`,
  `class_names` apply) or 'task' (the model's task head, `model.task`); `n_bins`
  (default 15). Writes plots/<name>_reliability.png.

  Metrics: `ece`, `mce`, `accuracy`, `mean_confidence`.
  """
  where = f"config.evals.{ctx.name}"
  if c.logits == "zero_shot":
    logits, labels, _ = _zero_shot_logits(ctx, c, where)
  elif c.logits == "task":
    outputs = ctx.outputs(c.split, c.batch_size)
    if outputs["logits"] is None:
      raise ValueError(f"{where}.logits='task': the model has no task head (model.task); "
                       "use logits='zero_shot' or configure a task head")
    logits, labels = outputs["logits"], _labels(outputs, where)
  else:
    raise ValueError(f"{where}.logits must be 'zero_shot' or 'task', got {c.logits!r}")
  diagram = calibration_lib.reliability_diagram(logits, labels, c.n_bins, from_logits=True)
  if ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_reliability_diagram(
        diagram, ctx.plot_path("reliability.png"),
        title=f"{c.logits} logits, {c.split}, step {ctx.step}")
  return {k: diagram[k] for k in ("ece", "mce", "accuracy", "mean_confidence")}


@register("geometry", {"pairs": (), "k": 10, "max_examples": 2000, "plot": True})
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
  where = f"config.evals.{ctx.name}"
  outputs = ctx.outputs(c.split, c.batch_size)
  names = sorted(outputs["embeddings"])
  pairs = [tuple(p) for p in c.pairs] or list(itertools.combinations(names, 2))
  limit = slice(0, c.max_examples)
  emb = {m: e[limit] for m, e in outputs["embeddings"].items()}
  feats = {m: f[limit] for m, f in outputs["features"].items()}
  masks = {m: np.asarray(v[limit], bool) for m, v in outputs["mask"].items()}
  metrics = {}
  for m in names:
    if masks[m].sum() >= 2:
      metrics[f"{m}/uniformity"] = geometry_lib.uniformity(emb[m][masks[m]])
  for a, b in pairs:
    _modalities_of(outputs, (a, b), f"{where}.pairs {[a, b]}")
    keep = masks[a] & masks[b]
    if keep.sum() < 2:
      raise ValueError(f"{where}: fewer than 2 rows of {c.split!r} have both {a!r} and "
                       f"{b!r} present")
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
