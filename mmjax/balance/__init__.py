"""Modality balance: gradient-modulation methods chosen in `config.balance`.

  method   ''         none
           'ogm_ge'   OGM-GE (Peng et al., CVPR 2022)
           'mlb'      multi-loss gradient modulation (Kontras et al., BMVC 2024)
           'inforeg'  InfoReg (Huang et al., CVPR 2025)
           'cggm'     CGGM (Guo et al., NeurIPS 2024): magnitude, and the direction
                      term added to the objective

Each reads every modality's auxiliary unimodal head (`model.task.unimodal_weight` > 0,
objective 'task'), so it composes with any fusion kind, and is an
`optax.GradientTransformationExtraArgs` chained in front of the optimizer
(`chain(config, tx)`); its state (previous accuracies, InfoReg's anchor params and
Fisher traces) is part of the optimizer state, so checkpoints and exact resume carry it.
The rules and their defaults: `mmjax.balance.rules`, docs/balance.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax import checks
from mmjax import collectives
from mmjax.balance import rules
from mmjax.balance.rules import (cggm_coefficients, inforeg_strengths, mlb_coefficients,
                                 ogm_ge_coefficients)

METHODS = ("ogm_ge", "mlb", "inforeg", "cggm")
# Each method's coefficients and their defaults (the papers').
DEFAULTS = {
    "ogm_ge": {"alpha": 0.8, "noise": True},
    "mlb": {"alpha": 0.8},
    "inforeg": {"beta": 0.95, "threshold": 0.05, "period": 100, "window": 10},
    "cggm": {"rho": 1.3, "lamda": 0.2},
}


def balance_config(method: str = "", **fields) -> ml_collections.ConfigDict:
  """`config.balance`: `method` ('' none, or one of METHODS), `modalities` (the
  modulated ones; (): all the model's), the step window [`start_step`, `end_step`)
  (end 0: to the end), and each method's coefficients at their papers' defaults."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.modalities = ()
  c.start_step = 0
  c.end_step = 0
  for name, defaults in DEFAULTS.items():
    c[name] = ml_collections.ConfigDict(dict(defaults))
  c.lock()
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def enabled(config) -> bool:
  b = config.get("balance")
  return b is not None and bool(b.method)


def modulated(config) -> tuple[str, ...]:
  """The modalities `config.balance` modulates, checked against the model's."""
  b = config.balance
  have = tuple(sorted(config.model.encoders.keys()))
  chosen = tuple(sorted(b.modalities)) or have
  for m in chosen:
    if m not in have:
      raise ValueError(f"balance.modalities: the model has no modality {m!r} "
                       f"(model.encoders has {list(have)})")
  return chosen


def check(config) -> None:
  """Every check of `config.balance`, against the model and objective."""
  b = config.get("balance")
  if b is None or not b.method:
    return
  if b.method not in METHODS:
    raise ValueError(f"balance.method={b.method!r}: use '' (none) or one of {METHODS}")
  have = sorted(config.model.encoders.keys())
  if len(have) < 2:
    raise ValueError(f"balance.method={b.method!r} balances modalities against each other; "
                     f"the model has one, {have} (model.encoders)")
  chosen = modulated(config)
  if len(chosen) < 2:
    raise ValueError(f"balance.modalities={list(b.modalities)}: name two or more, or () for "
                     "all the model's")
  checks.check_count("balance.start_step", b.start_step, low=0)
  checks.check_count("balance.end_step", b.end_step, low=0)
  if b.end_step and b.end_step <= b.start_step:
    raise ValueError(f"balance.end_step={b.end_step} must be after balance.start_step="
                     f"{b.start_step} (or 0: to the end)")
  task = config.model.get("task")
  if task is None or not task.get("unimodal_weight", 0.0):
    raise ValueError(f"balance.method={b.method!r} reads each modality's confidence from "
                     "the auxiliary unimodal heads: set model.task.unimodal_weight > 0 "
                     "(docs/fusion.md, 'Auxiliary unimodal heads')")
  if "task" not in str(config.objective.kind).split("+"):
    raise ValueError(f"balance.method={b.method!r} needs objective.kind 'task' (its "
                     f"unimodal heads' metrics); got {config.objective.kind!r}")
  c = b[b.method]
  where = f"balance.{b.method}"
  if b.method in ("ogm_ge", "mlb"):
    checks.check_range(f"{where}.alpha", c.alpha, low=0, low_open=True)
  if b.method == "ogm_ge" and not isinstance(c.noise, bool):
    raise ValueError(f"{where}.noise must be True or False, got {c.noise!r}")
  if b.method == "inforeg":
    checks.check_range(f"{where}.beta", c.beta, low=0)
    checks.check_range(f"{where}.threshold", c.threshold, low=0, high=1, high_open=True)
    checks.check_count(f"{where}.period", c.period)
    checks.check_count(f"{where}.window", c.window)
  if b.method == "cggm":
    checks.check_range(f"{where}.rho", c.rho, low=0, low_open=True)
    checks.check_range(f"{where}.lamda", c.lamda, low=0)


def transform(config) -> optax.GradientTransformationExtraArgs:
  """The gradient transformation of `config.balance` (checked)."""
  check(config)
  b = config.balance
  ms, c = modulated(config), b[b.method]
  window = {"start_step": b.start_step, "end_step": b.end_step}
  if b.method == "ogm_ge":
    return rules.ogm_ge(ms, c.alpha, noise=c.noise, **window)
  if b.method == "mlb":
    return rules.mlb(ms, c.alpha, **window)
  if b.method == "inforeg":
    return rules.inforeg(ms, c.beta, threshold=c.threshold, period=c.period,
                         window=c.window, **window)
  return rules.cggm(ms, c.rho, **window)


def chain(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` unchanged without a balance method; else `optax.chain(balance, tx)`, to be
  updated with the step's metrics (`make_train_step(..., update_args=True)`)."""
  if not enabled(config):
    return tx
  return optax.chain(transform(config), tx)


# ---------------------------------------------------------------------------------------
# CGGM's direction term, a loss term.
# ---------------------------------------------------------------------------------------


def _global_sum(x, axis_name):
  return collectives.psum(x, axis_name) if axis_name else x


def cggm_direction_loss(logits, unimodal_logits, labels, mask, *, axis_name=None):
  """CGGM's direction term over the global batch:
  (sum_m |B_m| - sum_m B_m cos(g_m, g)) / K.

  g_m = softmax(unimodal logits of m) - onehot(label) on the examples where m is present,
  g the same for the fused logits on those examples: each head's cross-entropy gradient
  with respect to its logits, all in the same [B, C] space whatever the heads' widths.
  B_m = (A - a_m) / A from the unimodal heads' accuracies a_m on this batch (A their
  sum), without gradient: the weaker a head, the more the fused gradient is drawn to
  its direction. Returns (loss, {'cggm/cos/<m>': ..., 'cggm/weight/<m>': ...}).
  """
  names = sorted(unimodal_logits)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  fused = jax.nn.softmax(logits.astype(jnp.float32)) - onehot
  cosines, accuracies = [], []
  for m in names:
    u = unimodal_logits[m].astype(jnp.float32)
    present = jnp.asarray(mask[m], jnp.float32)[:, None]
    g_m = (jax.nn.softmax(u) - onehot) * present
    g = fused * present
    sums = _global_sum(jnp.stack([jnp.sum(g_m * g), jnp.sum(g_m * g_m), jnp.sum(g * g)]),
                       axis_name)
    cosines.append(sums[0] / jnp.sqrt(jnp.maximum(sums[1] * sums[2], 1e-24)))
    counts = _global_sum(jnp.stack([
        jnp.sum((jnp.argmax(u, -1) == labels) * present[:, 0]), jnp.sum(present)]),
        axis_name)
    accuracies.append(counts[0] / jnp.maximum(counts[1], 1.0))
  cos, acc = jnp.stack(cosines), jax.lax.stop_gradient(jnp.stack(accuracies))
  total = jnp.sum(acc) + 1e-8
  weight = (total - acc) / total
  loss = (jnp.sum(jnp.abs(weight)) - jnp.sum(weight * cos)) / len(names)
  metrics = {f"cggm/cos/{m}": jax.lax.stop_gradient(cos[i]) for i, m in enumerate(names)}
  metrics.update({f"cggm/weight/{m}": weight[i] for i, m in enumerate(names)})
  return loss, metrics


def with_direction_term(objective: Callable, lamda: float) -> Callable:
  """`objective` + lamda x `cggm_direction_loss` (logged as `cggm/direction_loss`)."""

  def wrapped(output, batch, objective_config, *, axis_name=None, step=None):
    loss, metrics = objective(output, batch, objective_config, axis_name=axis_name,
                              step=step)
    if output.unimodal_logits is None or output.logits is None:
      raise ValueError("balance 'cggm': the direction term needs the fused logits and "
                       "the unimodal heads' (model.task.unimodal_weight > 0)")
    term, extra = cggm_direction_loss(output.logits, output.unimodal_logits,
                                      batch["label"], batch["mask"], axis_name=axis_name)
    metrics = dict(metrics, **extra)
    metrics["cggm/direction_loss"] = jax.lax.stop_gradient(term)
    return loss + lamda * term, metrics

  wrapped.__name__ = getattr(objective, "__name__", "objective") + "+cggm_direction"
  return wrapped


def wrap_objective(config, objective: Callable) -> Callable:
  """The objective with the loss terms of `config.balance` (CGGM's direction term)."""
  if not enabled(config) or config.balance.method != "cggm":
    return objective
  check(config)
  lamda = float(config.balance.cggm.lamda)
  return with_direction_term(objective, lamda) if lamda else objective


__all__ = ["METHODS", "DEFAULTS", "balance_config", "enabled", "modulated", "check",
           "transform", "chain", "cggm_direction_loss", "with_direction_term",
           "wrap_objective", "ogm_ge_coefficients", "mlb_coefficients",
           "cggm_coefficients", "inforeg_strengths", "rules"]
