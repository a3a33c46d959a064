"""The gradient-modulation rules, as pure functions of per-modality scores, and the
optax transformations that apply them to each modality's encoder gradient.

Every rule is written for K >= 2 modalities: `scores` and the returned coefficients are
[K] arrays in the order of `modalities` (sorted). The transformations read the scores
from the train step's metrics (`mmjax.train.step.make_train_step(update_args=True)`):
each modality's auxiliary unimodal head reports its mean true-class probability
(`task/unimodal/<m>/confidence`) and its accuracy (`task/unimodal/<m>/accuracy`) on the
global batch. They scale or shift the gradient subtree `towers_<m>` of each modulated
modality and leave every other parameter's gradient as it came (docs/balance.md).

All arithmetic is elementwise or a reduction over one subtree, under jit: parameter
gradients may be sharded arrays.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

CONFIDENCE = "task/unimodal/{}/confidence"
ACCURACY = "task/unimodal/{}/accuracy"
TOWERS = "towers_{}"


# ---------------------------------------------------------------------------------------
# Coefficients: [K] scores -> [K] gradient multipliers.
# ---------------------------------------------------------------------------------------


def ogm_ge_coefficients(scores: jax.Array, alpha: float) -> jax.Array:
  """OGM-GE (Peng et al., CVPR 2022, Eq. 10): rho_m = s_m / min_j s_j (for two
  modalities, s_m over the other's, as in the paper); k_m = 1 - tanh(alpha rho_m) where
  rho_m > 1, else 1. The minimum as the reference for K > 2 is BalanceBenchmark's."""
  scores = jnp.asarray(scores, jnp.float32)
  ratio = scores / jnp.maximum(jnp.min(scores), 1e-12)
  return jnp.where(ratio > 1, 1 - jnp.tanh(alpha * ratio), 1.0)


def mlb_coefficients(scores: jax.Array, alpha: float) -> jax.Array:
  """Multi-loss gradient modulation (MLB; Kontras et al., BMVC 2024): rho_m = the mean
  of the other modalities' scores over s_m; k_m = 1 + tanh(alpha (rho_m - 1)), in (0, 2):
  a modality behind the others is sped up, one ahead slowed down, and k -> 1 as they
  even out."""
  scores = jnp.asarray(scores, jnp.float32)
  k = scores.shape[0]
  others = (jnp.sum(scores) - scores) / (k - 1)
  ratio = others / jnp.maximum(scores, 1e-12)
  return 1 + jnp.tanh(alpha * (ratio - 1))


def cggm_coefficients(accuracy: jax.Array, previous: jax.Array, rho: float) -> jax.Array:
  """CGGM's magnitude (Guo et al., NeurIPS 2024): with d_m = acc_m - previous acc_m (each
  unimodal classifier's improvement since the last step) and D = sum_m d_m,
  B_m = (D - d_m) / D and the encoder gradient is multiplied by rho B_m. D gets 1e-8,
  as in the authors' code."""
  d = jnp.asarray(accuracy, jnp.float32) - jnp.asarray(previous, jnp.float32)
  total = jnp.sum(d) + 1e-8
  return rho * (total - d) / total


def inforeg_strengths(scores: jax.Array, growth: jax.Array, beta: float,
                      threshold: float) -> jax.Array:
  """InfoReg (Huang et al., CVPR 2025): a modality ahead of the others (gap_m = s_m -
  mean of the others' scores > 0) that is still in its prime learning window (the
  relative growth of its Fisher trace, `growth`, above `threshold`) gets the proximal
  strength beta exp(tanh(gap_m)); the others 0."""
  scores = jnp.asarray(scores, jnp.float32)
  k = scores.shape[0]
  gap = scores - (jnp.sum(scores) - scores) / (k - 1)
  on = (gap > 0) & (jnp.asarray(growth) > threshold)
  return jnp.where(on, beta * jnp.exp(jnp.tanh(gap)), 0.0)


# ---------------------------------------------------------------------------------------
# Helpers over the gradient tree.
# ---------------------------------------------------------------------------------------


def read_scores(metrics, modalities: Sequence[str], template: str) -> jax.Array:
  missing = [m for m in modalities if template.format(m) not in metrics]
  if missing:
    raise ValueError(f"balance: the train step's metrics have no {template.format('<m>')!r} "
                     f"for {missing}: the balance methods read each modality's auxiliary "
                     "unimodal head; set model.task.unimodal_weight > 0 and "
                     "objective.kind 'task'")
  return jnp.stack([jnp.asarray(metrics[template.format(m)], jnp.float32)
                    for m in modalities])


def towers(tree, modalities: Sequence[str]) -> dict:
  """{m: tree['towers_<m>']}; a modality without a tower is an error naming it."""
  missing = [m for m in modalities if TOWERS.format(m) not in tree]
  if missing:
    raise ValueError(f"balance: the params have no {[TOWERS.format(m) for m in missing]}; "
                     f"their top-level keys are {sorted(tree)}")
  return {m: tree[TOWERS.format(m)] for m in modalities}


def _with_towers(tree, new: dict) -> dict:
  out = dict(tree)
  for m, sub in new.items():
    out[TOWERS.format(m)] = sub
  return type(tree)(out) if not isinstance(tree, dict) else out


def active(step, start_step: int, end_step: int) -> jax.Array:
  """The modulation window: start_step <= step, and step < end_step unless end_step = 0."""
  step = jnp.asarray(step)
  on = step >= start_step
  return on & (step < end_step) if end_step > 0 else on


def scale_towers(grads, modalities: Sequence[str], coefficients: jax.Array) -> Any:
  """grads with towers_<m> multiplied by coefficients[i] (i: m's index)."""
  parts = towers(grads, modalities)
  return _with_towers(grads, {
      m: jax.tree.map(lambda g, c=coefficients[i]: (g * c).astype(g.dtype), parts[m])
      for i, m in enumerate(modalities)})


def gaussian_like_gradient(tree, reference, rng, on: jax.Array) -> Any:
  """OGM-GE's generalisation enhancement: each leaf of 2 dimensions or more gets
  N(0, std^2) noise (its own key), std that of the same leaf of `reference` (the
  gradient before modulation, as in the authors' code), where `on`; other leaves
  unchanged."""
  leaves, treedef = jax.tree.flatten(tree)
  references = treedef.flatten_up_to(reference)
  keys = jax.random.split(rng, max(len(leaves), 1))
  out = []
  for leaf, ref, key in zip(leaves, references, keys):
    if leaf.ndim < 2:
      out.append(leaf)
      continue
    std = jnp.std(ref.astype(jnp.float32)) + 1e-8
    noise = std * jax.random.normal(key, leaf.shape, jnp.float32)
    out.append(jnp.where(on, leaf + noise.astype(leaf.dtype), leaf))
  return treedef.unflatten(out)


def fisher_trace(tree) -> jax.Array:
  """InfoReg's per-step Fisher trace of one encoder: sum over its leaves of mean(g^2)."""
  return sum(jnp.mean(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------
# The transformations.
# ---------------------------------------------------------------------------------------


class CoefficientState(NamedTuple):
  """The coefficients applied at the last step ([K], 1 outside the window) and, for
  CGGM, the unimodal accuracies they were computed from."""
  coefficients: jax.Array
  previous: jax.Array


def _extra(extra_args, name):
  if name not in extra_args:
    raise ValueError(f"balance: the optimizer update needs `{name}=`; build the train step "
                     "with make_train_step(..., update_args=True)")
  return extra_args[name]


def coefficient_transform(modalities: Sequence[str], rule: Callable, *, start_step: int = 0,
                          end_step: int = 0, score: str = CONFIDENCE,
                          noise: bool = False) -> optax.GradientTransformationExtraArgs:
  """A gradient transformation that multiplies towers_<m>'s gradient by
  `rule(scores, previous)[i]` inside the window (`active`), optionally adding OGM-GE's
  Gaussian noise there; `scores` are the metrics `score.format(m)`."""
  modalities = tuple(modalities)
  k = len(modalities)

  def init(params):
    towers(params, modalities)
    return CoefficientState(jnp.ones((k,), jnp.float32), jnp.zeros((k,), jnp.float32))

  def update(updates, state, params=None, **extra_args):
    del params
    scores = read_scores(_extra(extra_args, "metrics"), modalities, score)
    on = active(_extra(extra_args, "step"), start_step, end_step)
    coefficients = jnp.where(on, rule(scores, state.previous), 1.0)
    original = towers(updates, modalities)
    updates = scale_towers(updates, modalities, coefficients)
    if noise:
      rng = _extra(extra_args, "rng")
      parts = towers(updates, modalities)
      updates = _with_towers(updates, {
          m: gaussian_like_gradient(parts[m], original[m],
                                    jax.random.fold_in(rng, 0x6E0 + i), on)
          for i, m in enumerate(modalities)})
    return updates, CoefficientState(coefficients, scores)

  return optax.GradientTransformationExtraArgs(init, update)


def ogm_ge(modalities, alpha: float = 0.8, *, noise: bool = True, start_step: int = 0,
           end_step: int = 0) -> optax.GradientTransformationExtraArgs:
  """OGM-GE: `ogm_ge_coefficients` on the unimodal heads' confidences, then the
  Gaussian noise of the generalisation enhancement (`noise=False`: plain OGM)."""
  return coefficient_transform(modalities, lambda s, _: ogm_ge_coefficients(s, alpha),
                               start_step=start_step, end_step=end_step, noise=noise)


def mlb(modalities, alpha: float = 0.8, *, start_step: int = 0, end_step: int = 0
        ) -> optax.GradientTransformationExtraArgs:
  """Multi-loss gradient modulation: `mlb_coefficients` on the confidences."""
  return coefficient_transform(modalities, lambda s, _: mlb_coefficients(s, alpha),
                               start_step=start_step, end_step=end_step)


def cggm(modalities, rho: float = 1.3, *, start_step: int = 0, end_step: int = 0
         ) -> optax.GradientTransformationExtraArgs:
  """CGGM's magnitude: `cggm_coefficients` on the unimodal heads' batch accuracies
  against the previous step's (kept in the state; zeros before the first step, as in
  the authors' code)."""
  return coefficient_transform(modalities,
                               lambda acc, prev: cggm_coefficients(acc, prev, rho),
                               start_step=start_step, end_step=end_step, score=ACCURACY)


class InfoRegState(NamedTuple):
  """anchor: the modulated towers' params at the start of the current period
  ({'towers_<m>': subtree});
  period_trace [K]: the Fisher traces summed over the period so far; traces [K, W+1]:
  the last W+1 periods' (oldest first, zeros before there were any); periods: how many
  have ended; growth [K]: the relative growth of the trace at the last period's end
  (1 before the first); strengths [K]: the proximal strengths of the last step."""
  anchor: Any
  period_trace: jax.Array
  traces: jax.Array
  periods: jax.Array
  growth: jax.Array
  strengths: jax.Array


def inforeg(modalities, beta: float = 0.95, *, threshold: float = 0.05,
            period: int = 100, window: int = 10, start_step: int = 0, end_step: int = 0
            ) -> optax.GradientTransformationExtraArgs:
  """InfoReg: in its prime learning window, a modality ahead of the others gets the
  proximal gradient beta_m (theta_m - theta_m at the period's start) added to its
  encoder's gradient (the gradient of (beta_m / 2) ||theta_m - anchor_m||^2).

  A period of `period` steps stands for the authors' epoch: the anchor is the params at
  its start, the Fisher trace of each encoder (sum over its leaves of mean(g^2)) is
  summed over it, and at its end the growth of modality m is
  (T1 - T2) / T1 with T1 the mean of the last `window` periods' traces and T2 the mean
  of the `window` before the last (zeros where there are fewer), as in their code.
  """
  modalities = tuple(modalities)
  k = len(modalities)

  def init(params):
    # Keyed like the params ('towers_<m>'), so that a sharded layout of the params
    # (FSDP) applies to the anchor too.
    anchor = {TOWERS.format(m): sub for m, sub in towers(params, modalities).items()}
    return InfoRegState(anchor=jax.tree.map(jnp.asarray, anchor),
                        period_trace=jnp.zeros((k,), jnp.float32),
                        traces=jnp.zeros((k, window + 1), jnp.float32),
                        periods=jnp.zeros((), jnp.int32),
                        growth=jnp.ones((k,), jnp.float32),
                        strengths=jnp.zeros((k,), jnp.float32))

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("balance 'inforeg' needs the params in the optimizer update")
    step = jnp.asarray(_extra(extra_args, "step"))
    scores = read_scores(_extra(extra_args, "metrics"), modalities, CONFIDENCE)
    current = {TOWERS.format(m): sub for m, sub in towers(params, modalities).items()}
    # A period ends before this step: record its trace, take a new anchor.
    ends = (step > 0) & (step % period == 0)
    traces = jnp.where(ends, jnp.concatenate([state.traces[:, 1:],
                                              state.period_trace[:, None]], 1), state.traces)
    t1 = jnp.sum(traces[:, 1:], 1) / window
    t2 = jnp.sum(traces[:, :-1], 1) / window
    growth = jnp.where(ends, (t1 - t2) / jnp.maximum(t1, 1e-30), state.growth)
    anchor = jax.tree.map(lambda a, p: jnp.where(ends, p, a), state.anchor, current)
    period_trace = jnp.where(ends, 0.0, state.period_trace)
    # This step's trace counts towards the current period (the unregulated gradient).
    grads = towers(updates, modalities)
    period_trace = period_trace + jnp.stack([fisher_trace(grads[m]) for m in modalities])
    on = active(step, start_step, end_step)
    strengths = jnp.where(on, inforeg_strengths(scores, growth, beta, threshold), 0.0)
    updates = _with_towers(updates, {
        m: jax.tree.map(lambda g, p, a, b=strengths[i]: (g + b * (p - a)).astype(g.dtype),
                        grads[m], current[TOWERS.format(m)], anchor[TOWERS.format(m)])
        for i, m in enumerate(modalities)})
    return updates, InfoRegState(anchor, period_trace, traces,
                                 state.periods + ends.astype(jnp.int32), growth, strengths)

  return optax.GradientTransformationExtraArgs(init, update)
