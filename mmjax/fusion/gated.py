"""Entropy-gated fusion after AECF (Chlon et al., "Robust Multimodal Learning
via Entropy-Gated Contrastive Fusion", 2025).

A small MLP gate looks at all (zero-filled) modality features and the
presence bits and gives each sample a softmax over its *present* modalities,
p[b, m] (exactly 0 for absent ones). The joint representation is the
gate-weighted sum of per-modality projections.

Collapse of the gate onto one modality is what makes a fusion layer brittle
when that modality goes missing, so the gate's entropy H_b is rewarded with
a coefficient adapted per instance:

  H_b    = -sum_m p[b, m] log p[b, m]
  Hn_b   = H_b / log(M_b)   normalised entropy in [0, 1]; M_b = present count
  lam_b  = entropy_coeff * stop_gradient(1 - Hn_b)    (0 when M_b = 1)
  loss/gate_entropy = -mean_b lam_b * H_b

A confident (collapsed) gate gets the strongest push towards spreading its
weight; an already uniform gate is left alone. The coefficient formula is
this library's reading of the paper's per-instance adaptation
(`entropy_per_instance=True`, the module default).

As the authors' code trains (`entropy_per_instance=False`): one scalar
coefficient per step, lam_t = schedule(step), and loss/gate_entropy =
-lam_t * mean_b H_b. `entropy_coeff` is a number or a schedule config
(`mmjax.schedules`; the authors' is the 'aecf' shape: free period, linear
ramp, flat, cosine decay over the last tenth); with the per-instance
coefficient the schedule scales lam_b. The authors' masking is
`mask_rate`: in training every present modality is dropped with probability
pi_t = schedule(step) (their ramp pi_max * min(1, t / warmup) is the
'linear' shape), at least one kept per sample. Both schedules are evaluated
at the `step` the train step passes; a call without a step (eval) uses their
final values (masking is training-only anyway).

The paper's second training device is a masking curriculum driven by gate
entropy: extra training-time masking aimed at the modalities an
over-confident gate leans on (`entropy_targeted_mask`). With
`curriculum_rate > 0` the module applies it itself in training: a first,
gradient-free pass of the gate gives the probabilities, the targeted mask is
sampled from them, and the fusion runs on the reduced mask. The masking
grows as the gate sharpens (a near-uniform gate, as at initialisation, is
barely masked), so the entropy itself paces the curriculum; a caller that
knows the training step can add a linear ramp of the rate with
`entropy_curriculum_mask`. The paper's contrastive calibration term (CEC) is not
part of this module (docs/fusion.md says what of its definition is missing);
calibration per modality subset is measured by the `robustness` evaluator.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import schedules
from mmjax.fusion import common
from mmjax.fusion.heads import StackedDense

Array = jax.Array


def gate_entropy(probs: Array, present: Array) -> tuple[Array, Array]:
  """Entropy of per-sample gate distributions over present modalities.

  Args:
    probs: [B, M] gate probabilities (0 on absent modalities).
    present: bool [B, M].

  Returns:
    (entropy [B], normalised entropy [B] = entropy / log(present count), which
    is defined as 1 when at most one modality is present).
  """
  safe = jnp.where(present & (probs > 0), probs, 1.0)
  entropy = -jnp.sum(jnp.where(present, probs * jnp.log(safe), 0.0), axis=-1)
  count = jnp.sum(present, axis=-1)
  max_entropy = jnp.log(jnp.maximum(count, 2).astype(probs.dtype))
  normalized = jnp.where(count > 1, entropy / max_entropy, 1.0)
  return entropy, normalized


class EntropyGate(nn.Module):
  """Two-layer MLP gate: softmax over the present modalities.

  Attributes:
    hidden_dim: hidden width (default: D).
    temperature: softmax temperature of the gate logits.
    dropout_rate: dropout on the hidden layer (training only).
  """
  hidden_dim: int | None = None
  temperature: float = 1.0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, present: Array, train: bool = False) -> Array:
    """x [B, M, D] zero-filled, present bool [B, M] -> probabilities [B, M]."""
    batch, num_modalities, width = x.shape
    h = jnp.concatenate([x.reshape(batch, num_modalities * width),
                         present.astype(x.dtype)], axis=-1)
    h = nn.gelu(nn.Dense(self.hidden_dim or width, name="hidden")(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(num_modalities, name="logits")(h).astype(jnp.float32)
    logits = jnp.where(present, logits / self.temperature, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(present, probs, 0.0)


class GatedFusion(nn.Module):
  """Entropy-gated fusion (AECF): gate-weighted sum of modality projections.

  aux (losses already weighted):
    loss/gate_entropy          -mean_b lam_b * H_b (see module doc; lam_b = lam_t
                               without the per-instance coefficient)
    stats/gate_entropy         mean gate entropy (nats)
    stats/gate_entropy_normalized  mean entropy / log(present count)
    stats/gate_entropy_coeff   mean per-instance coefficient lam_b
    stats/gate_weight          [M] mean gate weight of each modality over the
                               samples where it is present (sorted-name order)
    stats/gate_entropy_schedule  lam_t, the scheduled coefficient at this step
    stats/mask_rate, stats/mask_masked  (training, mask_rate not 0) pi_t and the
                               mean number of modalities it removed per sample

  Attributes:
    gate_hidden_dim: hidden width of the gate MLP (default: D).
    temperature: gate softmax temperature.
    entropy_coeff: the entropy coefficient lam_t: a number >= 0 or a schedule
      config (`mmjax.schedules`, evaluated at the step; its final value without one).
    entropy_per_instance: multiply lam_t by stop_gradient(1 - Hn_b) per sample
      (this library's reading of the paper); False is the authors' code,
      -lam_t * mean_b H_b.
    project: apply a separate dense projection per modality before mixing
      (False: mix the features themselves; requires out_dim None).
    out_dim: output width (default: D).
    dropout_rate: dropout in the gate (training only).
    curriculum_rate: rate r of the entropy-targeted training masking (see
      `entropy_targeted_mask`; 0 turns it off); rng stream 'dropout'.
    mask_rate: the authors' training masking: each present modality dropped with
      probability pi_t (a number in [0, 1) or a schedule; 0 turns it off), at least
      one kept; applied before the entropy-targeted masking; rng stream 'dropout'.
    modalities: expected modality names, or None to accept any.
  """
  produces_task_output: ClassVar[bool] = False
  gate_hidden_dim: int | None = None
  temperature: float = 1.0
  entropy_coeff: float | tuple | Mapping = 0.1
  entropy_per_instance: bool = True
  project: bool = True
  out_dim: int | None = None
  dropout_rate: float = 0.0
  curriculum_rate: float = 0.0
  mask_rate: float | tuple | Mapping = 0.0
  modalities: Sequence[str] | None = None

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"gated temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.curriculum_rate <= 1.0:
      raise ValueError(f"gated curriculum_rate must be in [0, 1], got "
                       f"{self.curriculum_rate}")
    schedules.check(self.entropy_coeff, "gated entropy_coeff")
    schedules.check(self.mask_rate, "gated mask_rate", upper=1.0)
    if not self.project and self.out_dim is not None:
      raise ValueError("gated out_dim needs project=True (without a projection "
                       "the output width is the feature width)")
    super().__post_init__()

  def setup(self):
    self.gate = EntropyGate(self.gate_hidden_dim, self.temperature,
                            self.dropout_rate)
    self.projection = StackedDense(self.out_dim) if self.project else None

  def gate_probabilities(self, features: Mapping[str, Array],
                         mask: Mapping[str, Array]) -> Array:
    """Gate probabilities [B, M] (sorted-name order; 0 where absent).

    For the trainer's curriculum: `module.apply(variables, features, mask,
    method='gate_probabilities')`, then `entropy_curriculum_mask`.
    """
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    return self.gate(x, present, train=False)

  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False, step: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim or D] and aux (see class doc).

    `step`: int scalar training step for `entropy_coeff` and `mask_rate`
    schedules; None uses their final values.
    """
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    aux_curriculum = {}
    if train and self.mask_rate != 0.0:
      rate = schedules.value_at(self.mask_rate, step, "gated mask_rate")
      u = jax.random.uniform(self.make_rng("dropout"), present.shape)
      kept = common.restore_one_present(present & (u >= rate), present, u)
      aux_curriculum["stats/mask_rate"] = rate
      aux_curriculum["stats/mask_masked"] = jnp.mean(
          jnp.sum(present & ~kept, axis=1).astype(jnp.float32))
      present = kept
      x = jnp.where(present[..., None], x, jnp.zeros((), x.dtype))
    if train and self.curriculum_rate > 0:
      first = jax.lax.stop_gradient(self.gate(x, present, train=False))
      kept = entropy_targeted_mask(present, first, self.make_rng("dropout"),
                                   rate=self.curriculum_rate)
      aux_curriculum["stats/curriculum_masked"] = jnp.mean(
          jnp.sum(present & ~kept, axis=1).astype(jnp.float32))
      present = kept
      x = jnp.where(present[..., None], x, jnp.zeros((), x.dtype))
    probs = self.gate(x, present, train=train)
    values = x if self.projection is None else self.projection(x)
    joint = jnp.einsum("bm,bmd->bd", probs.astype(values.dtype), values)

    entropy, normalized = gate_entropy(probs, present)
    lam_t = schedules.value_at(self.entropy_coeff, step, "gated entropy_coeff")
    coeff = jnp.broadcast_to(lam_t, entropy.shape)
    if self.entropy_per_instance:
      coeff = coeff * jax.lax.stop_gradient(1.0 - normalized)
    present_f = present.astype(jnp.float32)
    aux = {
        "loss/gate_entropy": -jnp.mean(coeff * entropy),
        "stats/gate_entropy": jnp.mean(entropy),
        "stats/gate_entropy_normalized": jnp.mean(normalized),
        "stats/gate_entropy_coeff": jnp.mean(coeff),
        "stats/gate_entropy_schedule": lam_t,
        "stats/gate_weight": (jnp.sum(probs * present_f, axis=0)
                              / jnp.maximum(jnp.sum(present_f, axis=0), 1.0)),
        "stats/num_present": jnp.mean(jnp.sum(present_f, axis=1)),
        **aux_curriculum,
    }
    return joint, aux


def curriculum_rate(step, max_rate: float, ramp_steps: int) -> Array:
  """Masking rate max_rate * min(1, step / ramp_steps) (a linear ramp)."""
  if not 0.0 <= max_rate <= 1.0:
    raise ValueError(f"curriculum max_rate must be in [0, 1], got {max_rate}")
  if ramp_steps < 0:
    raise ValueError(f"curriculum ramp_steps must be >= 0, got {ramp_steps}")
  progress = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(ramp_steps, 1))
  return max_rate * jnp.clip(progress, 0.0, 1.0)


def entropy_curriculum_mask(mask: Mapping[str, Array] | Array, gate_probs: Array,
                            rng: Array, *, step, max_rate: float = 0.5,
                            ramp_steps: int = 1000, keep_at_least_one: bool = True):
  """Samples extra training masking aimed at what an over-confident gate uses.

  With rate r_t = curriculum_rate(step, max_rate, ramp_steps), normalised gate
  entropy Hn_b and M_b present modalities, modality m of sample b is dropped
  with probability

    min(1, r_t * (1 - Hn_b) * M_b * p[b, m]).

  A uniform gate (Hn_b = 1) gets no extra masking; a gate collapsed on one
  modality has that modality dropped with probability min(1, r_t * M_b), which
  forces the gate and the model to use the others. A training loop that
  knows the step can call this before the forward pass:

    probs = fusion.apply(variables, features, mask, method='gate_probabilities')
    mask = entropy_curriculum_mask(mask, probs, rng, step=step, ...)

  (`GatedFusion(curriculum_rate=r)` applies the same masking at a constant
  rate inside its own training forward pass.)

  Args:
    mask: dict modality -> bool [B] (or bool [B, M]).
    gate_probs: [B, M] gate probabilities in sorted-name order.
    rng: PRNG key.
    step: training step (int or int array).
    max_rate: final rate r.
    ramp_steps: steps of the linear ramp from 0 to max_rate.
    keep_at_least_one: if every present modality of a sample was dropped, keep
      the one the gate relied on least.

  Returns:
    The new mask (same structure as `mask`), a subset of the old one.
  """
  rate = curriculum_rate(step, max_rate, ramp_steps)
  return entropy_targeted_mask(mask, gate_probs, rng, rate=rate,
                               keep_at_least_one=keep_at_least_one)


def entropy_targeted_mask(mask: Mapping[str, Array] | Array, gate_probs: Array,
                          rng: Array, *, rate, keep_at_least_one: bool = True):
  """Drops modality m of sample b with probability min(1, r (1 - Hn_b) M_b p[b, m]).

  The core of `entropy_curriculum_mask` at a given rate r (see there).

  Args:
    mask: dict modality -> bool [B] (or bool [B, M]).
    gate_probs: [B, M] gate probabilities in sorted-name order.
    rng: PRNG key.
    rate: r in [0, 1] (a float or a scalar array).
    keep_at_least_one: if every present modality of a sample was dropped, keep
      the one the gate relied on least.

  Returns:
    The new mask (same structure as `mask`), a subset of the old one.
  """
  present = common.stack_mask(mask)
  if gate_probs.shape != present.shape:
    raise ValueError(f"gate_probs must have the mask's shape [B, M] = "
                     f"{present.shape}, got {gate_probs.shape}")
  probs = jnp.where(present, jax.lax.stop_gradient(gate_probs).astype(jnp.float32), 0)
  probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-12)
  _, normalized = gate_entropy(probs, present)
  count = jnp.sum(present, axis=-1, keepdims=True).astype(jnp.float32)
  drop_prob = jnp.clip(rate * (1.0 - normalized)[:, None] * count * probs, 0.0, 1.0)
  u = jax.random.uniform(rng, present.shape)
  keep = present & ~(u < drop_prob)
  if keep_at_least_one:
    keep = common.restore_one_present(keep, present, -probs)
  return common.unstack_mask(keep, mask)
