"""Evaluators chosen by name in `config.evals`, big_vision style: the registry, the
evaluation context, and building and running them.

`config.evals.<name>` holds `kind` (a registered evaluator; defaults to `<name>`),
`split`, `every`, `batch_size` and the evaluator's own fields
(`config_lib.evaluator_config` writes a complete entry; `config_lib.EVALUATOR_FIELDS`
holds every evaluator's fields and defaults):

  every  > 0: every that many steps and at the end of the run;
         -1: every `config.eval_every_steps` steps and at the end;
          0: only at the end of the run (and in `--mode=eval`).

An evaluator is `fn(ctx, eval_config) -> {metric: float}`; the runner prefixes
`eval/<name>/`. It knows nothing of the config or of the data source: `ctx` (an
`EvalContext`) gives it the model's outputs on the batches of a split, a way to embed
texts, and what the source says about itself (`ctx.data`, a `DataInfo`: class names,
prompt templates, oracle ceilings where the source knows them). Each evaluator lives in
its own module beside this one: retrieval, zero_shot, linear_probe (and knn),
calibration, geometry, robustness, joint_retrieval, imbalance, factors (factor_probe).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax import checks
from mmjax import config_lib
from mmjax import registry as registry_lib
from mmjax.data import pipeline
from mmjax.data.info import DataInfo

# name -> Entry(fn, fields); fields come from `config_lib.EVALUATOR_FIELDS`.
EVALUATORS = registry_lib.Registry("evaluator")
# Per-evaluator checks run when the evaluators are built: name -> fn(c, data, where).
_CHECKS: dict[str, Callable] = {}
# The modules beside this one, imported before a name is looked up.
EVALUATOR_MODULES = ("retrieval", "zero_shot", "linear_probe", "calibration", "geometry",
                     "robustness", "joint_retrieval", "imbalance", "factors")


def register(name: str, check: Callable | None = None):
  """Registers `fn(ctx, eval_config) -> metrics` as evaluator kind `name`, with the
  fields `config_lib.EVALUATOR_FIELDS[name]` declares. `check(c, data, where)`, if
  given, runs when the evaluators are built: it raises for a config entry the data
  source cannot serve (e.g. class names the source does not have)."""
  fields = config_lib.evaluator_fields(name, where=f"register({name!r})")

  def wrap(fn):
    EVALUATORS.register(name, fn, fields)
    if check is not None:
      _CHECKS[name] = check
    return fn
  return wrap


def _import_evaluator_modules() -> None:
  for module in EVALUATOR_MODULES:
    importlib.import_module(f"{__name__}.{module}")


@dataclasses.dataclass
class EvalContext:
  """What evaluators may use: the model's outputs on a split, the data's `DataInfo`.

  Attributes:
    predict: global batch -> `ModelOutput` (the model in eval mode, params bound).
    featurize: the data's featurizer (`pipeline.Featurize`).
    sources: split name -> random-access source of raw records.
    data: what the source says about itself.
    modalities: the model's modalities (sorted).
    mesh: the device mesh the batches are placed on (axis 'data').
    workdir: where plots go (WORKDIR/plots).
    step: the training step being evaluated.
    anchor, objective: the training objective's anchor modality and kind, for
      evaluators whose defaults follow them (joint retrieval).
    name: the running evaluator's name in `config.evals`.
    reports: title -> markdown for summary.md, shared by the evaluators of a round.
  """
  predict: Callable
  featurize: Any
  sources: Callable[[str], Any]
  data: DataInfo
  modalities: tuple[str, ...]
  mesh: Any
  workdir: str
  step: int
  anchor: str | None = None
  objective: str = ""
  name: str = ""
  reports: dict = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def where(self) -> str:
    return f"config.evals.{self.name}"

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
      return self.sources(split)
    except ValueError as e:
      raise ValueError(f"{self.where}: evaluation split {split!r}: {e}") from None

  def run(self, source, featurize, batch_size: int, keys: Sequence[str]) -> dict:
    """The model on every example of `source` (featurised by `featurize`), in order:
    the `keys` of its output ('embeddings', 'features', 'logits') and of the batch
    ('mask', 'label', 'factors'), gathered from every process as host numpy arrays,
    plus 'logit_scale'. The one place evaluators batch, place and gather data."""
    num_data = self.mesh.shape["data"]
    if batch_size % num_data or batch_size % jax.process_count():
      raise ValueError(f"{self.where}.batch_size {batch_size} must be divisible by the "
                       f"{num_data} devices and {jax.process_count()} processes")
    pieces, logit_scale = [], None
    for local_batch, valid in pipeline.eval_batches(source, featurize,
                                                     global_batch_size=batch_size):
      batch = pipeline.to_global(local_batch, self.mesh)
      out = self.predict(batch)
      wanted = {k: getattr(out, k) if hasattr(out, k) else batch.get(k) for k in keys}
      host = jax.tree.map(
          lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), wanted)
      logit_scale = float(out.logit_scale)
      pieces.append(jax.tree.map(lambda x: x[:valid], host))
    outputs = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
    outputs["logit_scale"] = logit_scale
    return outputs

  def outputs(self, split: str, batch_size: int, max_examples: int | None = None
              ) -> dict[str, Any]:
    """Model outputs on the split (its first `max_examples`), cached per round.

    Returns {'embeddings': {m: [N,D]}, 'features': {m: [N,F]}, 'logits': [N,C] or None,
    'mask': {m: bool [N]}, 'label': [N] or None, 'factors': [N,F] or None,
    'logit_scale': float}.
    """
    key = ("split", split, batch_size, max_examples)
    if key not in self._cache:
      source = self.source(split)
      if max_examples is not None:
        source = _Head(source, max_examples)
      self._cache[key] = self.run(source, self.featurize, batch_size,
                                  ("embeddings", "features", "logits", "mask", "label",
                                   "factors"))
    return self._cache[key]

  def embed_texts(self, texts: Sequence[str], batch_size: int, *,
                  modality: str = "text") -> np.ndarray:
    """Embeddings [len(texts), D] of `texts` through the `modality` tower.

    The texts are tokenised like the data (`featurize.tokenizer`); every other
    modality is zero-filled and marked absent in the batch's mask.
    """
    if modality not in self.modalities:
      raise ValueError(f"{self.where}: the model has no {modality!r} tower to embed texts; "
                       f"it has {list(self.modalities)}")
    if "blank" not in self._cache:   # only the shapes matter; every run has a train split
      self._cache["blank"] = self.featurize((0, self.source("train")[0]))
    blank = self._cache["blank"]
    rows = []
    for t in texts:
      row = {m: np.zeros_like(blank[m]) for m in self.modalities}
      row[modality] = self.featurize.tokenizer.encode(t)
      row["mask"] = {m: np.bool_(m == modality) for m in blank["mask"]}
      rows.append(row)
    return self.run(rows, lambda index_and_row: index_and_row[1], batch_size,
                    ("embeddings",))["embeddings"][modality]


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


# ---------------------------------------------------------------------------------------
# Building and running.
# ---------------------------------------------------------------------------------------


def _field_modalities(field: str, value) -> list[str]:
  if field in ("modality", "text_modality"):
    return [value] if value else []
  if field == "modalities":
    return list(value)
  if field == "pairs":
    return [m for pair in value for m in pair]
  return []


def _check_entry(c, data: DataInfo, modalities: Sequence[str], where: str) -> None:
  """Splits the data lacks and modalities the model does not produce, named."""
  if data.splits:
    for field in ("split", "train_split", "val_split"):
      if field in c and c[field] not in data.splits:
        raise ValueError(f"{where}.{field}: the data ({data.name}) has no split "
                         f"{c[field]!r}; it has {list(data.splits)}")
  for field in ("modality", "text_modality", "modalities", "pairs"):
    if field in c:
      for m in _field_modalities(field, c[field]):
        if m not in modalities:
          raise ValueError(f"{where}.{field}: the model produces no {m!r} embeddings; "
                           f"it has {list(modalities)}")
  if "pairs" in c:
    for pair in c.pairs:
      if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"{where}.pairs: each pair names two different modalities, "
                         f"got {list(pair)}")
  for field in ("every", "batch_size"):
    if not isinstance(c[field], int) or isinstance(c[field], bool):
      raise ValueError(f"{where}.{field} must be an integer, got {c[field]!r}")
  if c.every < -1:
    raise ValueError(f"{where}.every={c.every}: use > 0 (every that many steps), -1 "
                     "(every config.eval_every_steps) or 0 (only at the end)")
  if c.batch_size <= 0:
    raise ValueError(f"{where}.batch_size must be positive, got {c.batch_size}")
  for field, low in _COUNT_FIELDS.items():
    if field in c:
      checks.check_count(f"{where}.{field}", c[field], low=low)
  if "ks" in c:
    for i, k in enumerate(c.ks):
      checks.check_count(f"{where}.ks[{i}]", k)
  if "temperature" in c:      # 0: a plain majority vote
    checks.check_range(f"{where}.temperature", c.temperature, low=0)


# Evaluator fields that are whole numbers, and their least value, wherever they appear
# (plot_max_k=0: no plot).
_COUNT_FIELDS = {"k": 1, "plot_max_k": 0, "n_bins": 1, "train_examples": 1, "steps": 1,
                 "max_examples": 1}


def build_evaluators(evals_config, default_every: int, *, data: DataInfo,
                     modalities: Sequence[str], only: Sequence[str] | None = None
                     ) -> dict[str, tuple[Callable, Any, int]]:
  """name -> (fn, config with defaults filled in, every).

  Every check of an evaluator's config runs here, once: unknown kinds (listing the
  valid ones) and fields, splits `data` lacks, modalities the model does not produce,
  and what the evaluator needs of the source (class names, ...). `only` keeps the
  named entries of `evals_config` (an unknown name is an error listing the
  configured ones).
  """
  _import_evaluator_modules()
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
    kind = c.get("kind") or name
    entry = EVALUATORS.lookup(kind, where)
    EVALUATORS.check_fields(kind, c.keys(), where)
    full = ml_collections.ConfigDict({**entry.fields, **{k: c[k] for k in c.keys()},
                                      "kind": kind})
    _check_entry(full, data, modalities, where)
    if kind in _CHECKS:
      _CHECKS[kind](full, data, where)
    out[name] = (entry.obj, full, default_every if full.every == -1 else full.every)
  return out


def run_evaluators(ctx: EvalContext, evaluators: Mapping[str, tuple], *, force: bool = False,
                   on_error: Callable[[str, int, Exception], None] | None = None
                   ) -> dict[str, float]:
  """Runs the evaluators due at `ctx.step` (all of them with `force`).

  An evaluator that raises stops the caller, unless `on_error(name, step, error)` is
  given: then that is called, the evaluator's metrics are left out and the others run.
  """
  metrics = {}
  for name, (fn, c, every) in evaluators.items():
    if force or (every > 0 and ctx.step % every == 0):
      try:
        results = {f"eval/{name}/{k}": float(v)
                   for k, v in fn(dataclasses.replace(ctx, name=name), c).items()}
      except Exception as e:  # pylint: disable=broad-except
        if on_error is None:
          raise
        on_error(name, ctx.step, e)
        continue
      metrics.update(results)
  return metrics


# ---------------------------------------------------------------------------------------
# Helpers shared by evaluators.
# ---------------------------------------------------------------------------------------


def present(outputs, modalities) -> np.ndarray:
  """bool [N]: rows where every one of `modalities` is present."""
  keep = np.ones(outputs["mask"][modalities[0]].shape[0], bool)
  for m in modalities:
    keep &= outputs["mask"][m].astype(bool)
  return keep


def labels(outputs, where: str) -> np.ndarray:
  if outputs.get("label") is None:
    raise ValueError(f"{where}: the data has no 'label'; classification evaluators need one")
  return outputs["label"].astype(np.int64)


def num_classes(data: DataInfo, labels_seen: Sequence[np.ndarray]) -> int:
  """The source's number of classes, or one more than the largest label seen."""
  return data.num_classes or int(max(int(y.max()) for y in labels_seen)) + 1


def pairs_of(c, modalities: Sequence[str]) -> list[tuple[str, str]]:
  """`c.pairs`, or every pair of the model's modalities."""
  names = sorted(modalities)
  return [tuple(p) for p in c.pairs] or [(a, b) for i, a in enumerate(names)
                                         for b in names[i + 1:]]
