"""Objectives: `config.objective` -> a loss on a `ModelOutput` and its batch.

An objective is `fn(output, batch, objective_config, *, axis_name, step=None) -> (loss,
metrics)`; `step` is the train state's step (updates applied so far) in training and
None in evaluation, for step-dependent terms (`mmjax.schedules`); the objectives here
take no schedule of their own (fusion modules apply theirs before `aux` reaches `task`).
Inside the train step's `shard_map` it must return the *global* loss, identical on
every device (alignment losses gather negatives over `axis_name`; local terms are
`pmean`-ed). Parameters are device-invariant in the step, so the gradient of that
global loss is the global-batch gradient on every device.

`objective.kind` names one registered objective, or several joined by '+', e.g.
'gram+matching': the loss is then the weighted sum of the terms, with
`objective.weights.<term>` (default 1.0), and each term's metrics keep its own
prefix. The registered objectives:

  clip      CLIP's softmax InfoNCE between the model's two modalities.
  siglip    SigLIP's sigmoid loss between the two modalities (device ring); needs
            `model.logit_bias_init`.
  pairwise  contrastive loss averaged over pairs of modalities: every modality
            against `objective.anchor` (`objective.pairs='anchor'`, ImageBind) or
            all pairs ('all'); `objective.pair_kind` 'clip' or 'siglip'.
  gram      GRAM: the volume spanned by the anchor and the other modalities
            (device ring); needs `objective.anchor`; absent modalities
            (`batch['mask']`) leave their sample's tuple.
  matching  GRAM's volume-guided matching: the model's matching head
            (`model.matching`) tells each sample's (anchor, tuple) pair from
            two hard negatives drawn in proportion to softmax(-volume); binary
            cross-entropy. Meant beside 'gram' ('gram+matching').
  task      classification cross-entropy of the task head plus the fusion's
            auxiliary losses.
  comm      CoMM: InfoNCE between the fused representations of two augmented views
            of each example (`mmjax.align.comm`); needs model.fusion and paired views.

Each objective registers the fields of `config.objective` it reads, with their
defaults (`OBJECTIVES[name].fields`); `kind` and `weights` belong to every one.
A config switches objectives by `objective.kind` alone: `base_config` lists every
objective's fields at their defaults, and a field left at its default is ignored by
the objectives that do not read it. A field set to another value than its default
for an objective that does not read it is an error naming it (a `label_smoothing`
on 'siglip' would otherwise be silently dropped), and so is a field no objective
has. `build(config.objective, config.model)` runs every check of the objective's
config, once, where the config becomes the loss function; the functions below are
math on a `ModelOutput` and leave the checks of their arguments to `mmjax.align`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mmjax import align
from mmjax import collectives
from mmjax import registry as registry_lib
from mmjax.align import comm as comm_lib
from mmjax.fusion import heads as heads_lib

OBJECTIVES = registry_lib.Registry("objective")
# Fields of `config.objective` that belong to every objective.
COMMON_FIELDS = ("kind", "weights")


def register(name: str, **fields):
  """Registers `fn(output, batch, objective_config, *, axis_name)` as objective `name`
  reading the `config.objective` fields `fields` (name=default)."""
  def wrap(fn):
    OBJECTIVES.register(name, fn, fields)
    return fn
  return wrap


def get(name: str) -> Callable:
  """The objective named by `objective.kind`: one registered name or 'a+b+...'."""
  return _combined(_terms(name)) if "+" in str(name) else OBJECTIVES.lookup(
      name, "objective.kind").obj


def _terms(name: str) -> tuple[str, ...]:
  if not isinstance(name, str) or not name:
    raise ValueError(f"objective.kind must be a registered objective name, got {name!r}; "
                     f"valid: {sorted(OBJECTIVES)}")
  terms = tuple(name.split("+"))
  for term in terms:
    if term not in OBJECTIVES:
      raise ValueError(f"objective.kind: unknown objective {term!r} in {name!r}; valid: "
                       f"{sorted(OBJECTIVES)}, or several joined by '+'")
  if len(set(terms)) != len(terms):
    raise ValueError(f"objective.kind {name!r} names an objective twice")
  return terms


def build(objective_config, model_config=None) -> Callable:
  """The loss of `config.objective`, every field checked here, once.

  Checks the kind, the fields (see the module doc), the weights, the values of the
  fields in use, and, with `model_config`, what the objectives need of the model: the
  anchor among its modalities, two modalities for 'clip' and 'siglip', a logit bias
  for the sigmoid losses, the matching head, a task head.
  """
  c = objective_config
  terms = _terms(c.kind)
  used = set(COMMON_FIELDS).union(*(OBJECTIVES[t].fields for t in terms))
  defaults = {}
  for entry in OBJECTIVES.values():
    defaults.update(entry.fields)
  for field in c.keys():
    if field in used:
      continue
    if field not in defaults:
      raise ValueError(f"objective.{field}: no objective has this field; the fields of "
                       f"objective.kind {c.kind!r} are {sorted(used)}")
    if c[field] != defaults[field]:
      raise ValueError(f"objective.{field}={c[field]!r} is not a field of objective.kind "
                       f"{c.kind!r}, whose fields are {sorted(used)}; leave it at its "
                       f"default ({defaults[field]!r}) or pick an objective that reads it")
  term_weights(c, terms)
  fields = {k: c.get(k, defaults.get(k)) for k in used}
  if "label_smoothing" in used and not 0.0 <= fields["label_smoothing"] < 1.0:
    raise ValueError(f"objective.label_smoothing must be in [0, 1), got "
                     f"{fields['label_smoothing']}")
  if "pairs" in used and fields["pairs"] not in ("anchor", "all"):
    raise ValueError(f"objective.pairs must be 'anchor' or 'all', got {fields['pairs']!r}")
  if "pair_kind" in used and fields["pair_kind"] not in ("clip", "siglip"):
    raise ValueError(f"objective.pair_kind must be 'clip' or 'siglip', got "
                     f"{fields['pair_kind']!r}")
  if model_config is not None:
    _check_model(c.kind, terms, fields, model_config)
  return get(c.kind)


def _check_model(kind, terms, fields, model_config) -> None:
  names = sorted(model_config.encoders.keys())
  anchor = fields.get("anchor")
  needs_anchor = {"gram", "matching"} & set(terms) or (
      "pairwise" in terms and fields.get("pairs") == "anchor")
  if needs_anchor and anchor is None:
    raise ValueError(f"objective {kind!r} needs objective.anchor, one of the model's "
                     f"modalities {names}")
  if anchor is not None and anchor not in names:
    raise ValueError(f"objective.anchor {anchor!r} is not among the model's modalities "
                     f"{names} (model.encoders)")
  for term in {"clip", "siglip"} & set(terms):
    if len(names) != 2:
      raise ValueError(f"objective {term!r} aligns two modalities; the model has {names} "
                       f"(use objective.kind='pairwise' or 'gram' for more)")
  sigmoid = "siglip" in terms or ("pairwise" in terms and fields["pair_kind"] == "siglip")
  if sigmoid and model_config.get("logit_bias_init") is None:
    raise ValueError(f"objective {kind!r} uses the sigmoid loss, which needs a learned "
                     "logit bias: set model.logit_bias_init (SigLIP uses -10, with "
                     "model.logit_scale_init = log 10)")
  if "matching" in terms and model_config.get("matching") is None:
    raise ValueError("objective 'matching' needs the model's matching head: set "
                     "model.matching (e.g. ml_collections.ConfigDict({'width': 64}))")
  if "task" in terms and (model_config.get("fusion") is None
                          or model_config.get("task") is None):
    raise ValueError("objective.kind='task' needs task logits: set model.fusion and "
                     "model.task (num_classes) in the config")


def _combined(terms: tuple[str, ...]) -> Callable:
  """Weighted sum of several objectives (`objective.weights.<term>`, default 1)."""

  def objective(output, batch, objective_config, *, axis_name=None, step=None):
    weights = term_weights(objective_config, terms)
    loss, metrics = 0.0, {}
    for term in terms:
      term_loss, term_metrics = OBJECTIVES[term].obj(output, batch, objective_config,
                                                 axis_name=axis_name, step=step)
      loss = loss + weights[term] * term_loss
      metrics.update(term_metrics)
      metrics[f"{term}/loss"] = jax.lax.stop_gradient(term_loss)
    return loss, metrics

  objective.__name__ = "+".join(terms)
  return objective


def term_weights(objective_config, terms) -> dict[str, float]:
  """`objective.weights` for `terms` (1.0 where unset); a weight for another name is
  an error (a typo would otherwise be a silently unweighted term)."""
  weights = dict(objective_config.get("weights") or {})
  unknown = sorted(set(weights) - set(terms))
  if unknown:
    raise ValueError(f"objective.weights has {unknown}, which objective.kind "
                     f"{objective_config.kind!r} does not name; its terms are {list(terms)}")
  out = {}
  for term in terms:
    w = weights.get(term, 1.0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
      raise ValueError(f"objective.weights.{term} must be a number >= 0, got {w!r}")
    out[term] = float(w)
  return out


def _modalities(output) -> list[str]:
  return sorted(output.embeddings)


def _masks(output, batch):
  """`batch['mask']` restricted to the model's modalities, or None without one."""
  mask = batch.get("mask")
  if not mask:
    return None
  missing = [m for m in _modalities(output) if m not in mask]
  if missing:
    raise ValueError(f"batch['mask'] has no entry for {missing}; it has {sorted(mask)}")
  return {m: mask[m] for m in _modalities(output)}


@register("clip", label_smoothing=0.0)
def clip_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """Symmetric InfoNCE between the two modalities of the model."""
  a, b = _modalities(output)
  loss, metrics = align.clip_loss(
      output.embeddings[a], output.embeddings[b], logit_scale=output.logit_scale,
      label_smoothing=objective_config.label_smoothing, axis_name=axis_name)
  return loss, {f"clip/{k}": v for k, v in metrics.items()}


@register("siglip")
def siglip_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """SigLIP's pairwise sigmoid loss between the two modalities (x, y in sorted order)."""
  del batch, objective_config
  a, b = _modalities(output)
  loss, metrics = align.siglip_loss(
      output.embeddings[a], output.embeddings[b], logit_scale=output.logit_scale,
      logit_bias=output.logit_bias, axis_name=axis_name)
  return loss, {f"siglip/{k}": v for k, v in metrics.items()}


@register("pairwise", anchor=None, pairs="anchor", pair_kind="clip", label_smoothing=0.0)
def pairwise_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """Contrastive loss averaged over the anchored or all pairs of modalities."""
  del batch
  pairs, kind = objective_config.pairs, objective_config.pair_kind
  anchor = objective_config.anchor
  loss, metrics = align.pairwise_loss(
      output.embeddings, anchor=anchor if pairs == "anchor" else None, kind=kind,
      logit_scale=output.logit_scale,
      logit_bias=output.logit_bias if kind == "siglip" else None,
      label_smoothing=objective_config.label_smoothing, axis_name=axis_name)
  return loss, {f"pairwise/{k}": v for k, v in metrics.items()}


@register("gram", anchor=None, label_smoothing=0.0, negatives_gradient=True)
def gram_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """GRAM between `objective.anchor` and the tuples of the other modalities."""
  anchor = objective_config.anchor
  loss, metrics = align.gram_loss(
      output.embeddings, anchor=anchor, logit_scale=output.logit_scale,
      label_smoothing=objective_config.label_smoothing, masks=_masks(output, batch),
      axis_name=axis_name,
      negatives_gradient=objective_config.get("negatives_gradient", True))
  return loss, {f"gram/{k}": v for k, v in metrics.items()}


def _gather(x, axis_name):
  return x if axis_name is None else collectives.all_gather(x, axis_name)


@register("matching", anchor=None)
def matching_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """GRAM's volume-guided matching (see `mmjax.align.matching`).

  Each valid sample gives three pairs to the model's matching head: its anchor with
  its own tuple (label 1), with a tuple drawn from the global batch in proportion to
  softmax(-volume * logit_scale) over the other valid samples (label 0), and its
  tuple with an anchor drawn the same way (label 0). The head sees the encoders'
  features (gathered over devices, so gradients reach the device that encoded a
  drawn negative).
  """
  anchor = objective_config.anchor
  if output.matcher.rng is None:
    raise ValueError("objective 'matching' draws negatives with the model's 'dropout' rng; "
                     "apply the model with train=True and rngs={'dropout': key}")
  masks = _masks(output, batch)
  negatives = align.matching_negatives(
      output.embeddings, anchor=anchor, logit_scale=output.logit_scale,
      rng=output.matcher.rng, masks=masks, axis_name=axis_name)
  others = [m for m in _modalities(output) if m != anchor]
  b = output.embeddings[anchor].shape[0]
  present = {m: (masks[m] if masks is not None else jnp.ones((b,), bool)) for m in others}

  def drawn(x, index):
    return jnp.take(_gather(x, axis_name), index, axis=0)

  tuple_index, anchor_index = negatives["negative_tuple"], negatives["negative_anchor"]
  anchor_features = output.features[anchor]
  # Pairs, in blocks of b: (anchor, own tuple), (anchor, drawn tuple), (drawn anchor,
  # own tuple).
  logits = output.matcher(
      anchor,
      jnp.concatenate([anchor_features, anchor_features,
                       drawn(anchor_features, anchor_index)]),
      {m: jnp.concatenate([output.features[m], drawn(output.features[m], tuple_index),
                           output.features[m]]) for m in others},
      {m: jnp.concatenate([present[m], drawn(present[m], tuple_index), present[m]])
       for m in others})
  positive, negative_tuple, negative_anchor = jnp.split(logits, 3)
  loss, metrics = align.matching_loss(
      positive, negative_tuple, negative_anchor, valid=negatives["valid"],
      has_negative=negatives["has_negative"], axis_name=axis_name)
  return loss, {f"matching/{k}": v for k, v in metrics.items()}


@register("comm", label_smoothing=0.0)
def comm_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """CoMM: InfoNCE between the fused representations of two views of each example,
  rows (2j, 2j + 1) of the batch (`mmjax.align.comm`; needs model.fusion)."""
  del batch
  if output.joint is None:
    raise ValueError("objective 'comm' needs the fused representation: set model.fusion")
  loss, metrics = comm_lib.comm_loss(output.joint, logit_scale=output.logit_scale,
                                     label_smoothing=objective_config.label_smoothing,
                                     axis_name=axis_name)
  return loss, {f"comm/{k}": v for k, v in metrics.items()}


def global_mean(x: jax.Array, axis_name=None) -> jax.Array:
  """Mean of a local per-example quantity over the global batch."""
  m = jnp.mean(x)
  return collectives.pmean(m, axis_name) if axis_name else m


@register("task")
def task_objective(output, batch, objective_config, *, axis_name=None, step=None):
  """Classification cross-entropy of the task head, plus the fusion's auxiliary losses.

  loss = mean over the global batch of CE(output.logits, batch['label'])
         + every `output.aux['loss/...']` term (already weighted by the fusion module;
           each is a local-batch statistic, averaged over devices)
         + with auxiliary unimodal heads (`model.task.unimodal_weight` = w > 0):
           w x mean over modalities m of CE(output.unimodal_logits[m], label),
           each averaged over the global batch's examples where m is present.

  Metrics: `task/cross_entropy`, `task/accuracy`, every aux loss under its own name and
  every scalar `stats/...` entry of `aux` (averaged over devices); with unimodal heads
  `task/unimodal_loss` and `task/unimodal/<m>/{cross_entropy,accuracy,confidence}`
  (confidence: the mean softmax probability of the true class).
  """
  del objective_config
  if "label" not in batch:
    raise ValueError("objective.kind='task' needs batch['label'], but the data produces "
                     f"only {sorted(k for k in batch if k != 'mask')}; configure a label "
                     "(data.label for the procedural world)")
  logits, labels = output.logits.astype(jnp.float32), batch["label"]
  cross_entropy = global_mean(heads_lib.task_loss(logits, labels), axis_name)
  accuracy = global_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis_name)
  metrics = {"task/cross_entropy": cross_entropy, "task/accuracy": accuracy}
  loss = cross_entropy
  for name in sorted(output.aux):
    value = output.aux[name]
    if jnp.ndim(value) != 0:
      continue    # per-expert vectors and the like are not logged as scalars
    value = global_mean(value, axis_name)
    if name.startswith("loss/"):
      loss = loss + value
    metrics[name] = value
  if output.unimodal_logits is not None:
    unimodal_loss, unimodal_metrics = _unimodal_losses(
        output.unimodal_logits, labels, batch["mask"], axis_name)
    loss = loss + output.unimodal_weight * unimodal_loss
    metrics.update(unimodal_metrics, **{"task/unimodal_loss": unimodal_loss})
  return loss, metrics


def _present_mean(x: jax.Array, present: jax.Array, axis_name=None) -> jax.Array:
  """Mean of per-example x over the global batch's examples where `present`."""
  sums = jnp.stack([jnp.sum(jnp.where(present, x, 0.0)), jnp.sum(present, dtype=x.dtype)])
  if axis_name:
    sums = collectives.psum(sums, axis_name)
  return sums[0] / jnp.maximum(sums[1], 1.0)


def _unimodal_losses(unimodal_logits, labels, mask, axis_name=None):
  """The auxiliary unimodal heads' cross-entropy, mean over modalities, and metrics."""
  losses, metrics = [], {}
  for m in sorted(unimodal_logits):
    logits = unimodal_logits[m].astype(jnp.float32)
    present = jnp.asarray(mask[m], bool)
    ce = _present_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                       present, axis_name)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    metrics[f"task/unimodal/{m}/cross_entropy"] = ce
    metrics[f"task/unimodal/{m}/accuracy"] = _present_mean(correct, present, axis_name)
    # The mean true-class probability: the score of the balance methods (mmjax.balance).
    metrics[f"task/unimodal/{m}/confidence"] = _present_mean(
        jnp.exp(-optax.softmax_cross_entropy_with_integer_labels(logits, labels)), present,
        axis_name)
    losses.append(ce)
  return sum(losses) / len(losses), metrics
