"""Shared pieces of the fusion modules: input checks, masks and combinations.

Every fusion module takes
  features: dict modality -> float [B, D] (already projected to a common width D)
  mask:     dict modality -> bool  [B]    (True = present)
and works internally on the modalities in sorted-name order, so that

  stacked features  x       [B, M, D]  (x[:, i] is modality sorted(features)[i])
  presence          present [B, M]
  combination index b = sum_i present[:, i] * 2**i,   1 <= b <= 2**M - 1

are well defined. Absent entries may hold garbage (even NaN/Inf); they are
replaced with `jnp.where` (never multiplied by zero, which keeps NaN) before any
computation, so an absent input can never change a module's output.

A sample with no modality present is an error. It is raised here when the mask
is concrete (eager calls, `init`); under `jax.jit` the values are unknown, so the
data pipeline / trainer must call `check_mask(batch['mask'])` on the host batch.
The modules themselves stay NaN-free on such rows (they divide by max(count, 1)).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.array_util import is_concrete, masked_mean  # noqa: F401  (re-exported)

Array = jax.Array


def modality_names(features: Mapping[str, Array], mask: Mapping[str, Array],
                   modalities: Sequence[str] | None = None) -> tuple[str, ...]:
  """Sorted modality names after checking `features` and `mask` agree.

  Args:
    features: dict modality -> [B, D].
    mask: dict modality -> [B].
    modalities: the modalities a module was configured with, or None to accept
      whatever `features` holds.

  Returns:
    The modality names in sorted order.

  Raises:
    ValueError: if a modality is in one dict but not the other, or differs from
      the configured `modalities`.
  """
  if not isinstance(features, Mapping) or not features:
    raise ValueError(f"features must be a non-empty dict modality -> [B, D] array, "
                     f"got {type(features).__name__}")
  if not isinstance(mask, Mapping):
    raise ValueError(f"mask must be a dict modality -> [B] bool array, got "
                     f"{type(mask).__name__}")
  only_features = sorted(set(features) - set(mask))
  only_mask = sorted(set(mask) - set(features))
  if only_features:
    raise ValueError(f"mask lacks modality {only_features} that features has "
                     f"(features: {sorted(features)}, mask: {sorted(mask)})")
  if only_mask:
    raise ValueError(f"features lack modality {only_mask} that mask has "
                     f"(features: {sorted(features)}, mask: {sorted(mask)})")
  names = tuple(sorted(features))
  if modalities is not None and set(modalities) != set(names):
    raise ValueError(f"fusion module was configured for modalities "
                     f"{sorted(modalities)} but got features for {list(names)}")
  return names


def stack_mask(mask: Mapping[str, Array] | Array,
               names: Sequence[str] | None = None) -> Array:
  """Presence as a bool [B, M] array in sorted-name (or `names`) order.

  Args:
    mask: dict modality -> bool [B], or an already stacked bool [B, M] array.
    names: order of the modalities; defaults to sorted(mask).

  Returns:
    bool [B, M].
  """
  if isinstance(mask, Mapping):
    names = tuple(sorted(mask)) if names is None else tuple(names)
    for name in names:
      m = mask[name]
      if jnp.ndim(m) != 1:
        raise ValueError(f"mask['{name}'] must have shape [B], got {jnp.shape(m)}")
      if jnp.asarray(m).dtype != jnp.bool_:
        raise ValueError(f"mask['{name}'] must be bool (True = present), got "
                         f"dtype {jnp.asarray(m).dtype}")
    sizes = {name: jnp.shape(mask[name])[0] for name in names}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"mask entries have different batch sizes: {sizes}")
    return jnp.stack([jnp.asarray(mask[name]) for name in names], axis=1)
  mask = jnp.asarray(mask)
  if mask.ndim != 2 or mask.dtype != jnp.bool_:
    raise ValueError(f"a stacked mask must be bool [B, M], got {mask.dtype} "
                     f"{mask.shape}")
  return mask


def check_mask(mask: Mapping[str, Array] | Array, allow_none: bool = False) -> None:
  """Raises ValueError if a sample has no modality present.

  Args:
    mask: dict modality -> bool [B] (or a stacked bool [B, M]).
    allow_none: accept samples with no modality present.

  Under `jax.jit` the mask values are abstract and nothing is checked: call this
  on the host batch (the data pipeline does) before the compiled step.
  """
  names = tuple(sorted(mask)) if isinstance(mask, Mapping) else None
  _check_present(stack_mask(mask), names, allow_none)


def _check_present(present: Array, names: Sequence[str] | None,
                   allow_none: bool) -> None:
  if allow_none or not is_concrete(present):
    return
  counts = np.asarray(present).sum(axis=1)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise ValueError(f"{empty.size} sample(s) have no modality present (batch "
                     f"rows {empty[:8].tolist()}{' ...' if empty.size > 8 else ''}"
                     f"; modalities {list(names) if names else None}); every "
                     f"sample needs at least one")


def stack_modalities(features: Mapping[str, Array], mask: Mapping[str, Array],
                     modalities: Sequence[str] | None = None,
                     allow_none: bool = False
                     ) -> tuple[tuple[str, ...], Array, Array]:
  """Checks and stacks the inputs of a fusion module.

  Args:
    features: dict modality -> float [B, D].
    mask: dict modality -> bool [B].
    modalities: configured modalities (None: take them from `features`).
    allow_none: accept samples with no modality present.

  Returns:
    (names, x, present): the sorted modality names, float [B, M, D] features
    with absent entries set to exactly zero, and bool [B, M] presence.

  Raises:
    ValueError: mismatched keys, shapes or dtypes, or (concrete masks only) a
      sample with no modality present.
  """
  names = modality_names(features, mask, modalities)
  shapes = {name: jnp.shape(features[name]) for name in names}
  for name, shape in shapes.items():
    if len(shape) != 2:
      raise ValueError(f"features['{name}'] must have shape [B, D], got {shape}")
    dtype = jnp.asarray(features[name]).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"features['{name}'] must be floating point, got {dtype}")
  if len(set(shapes.values())) > 1:
    raise ValueError(f"features must all share one shape [B, D] (project them to "
                     f"a common width first), got {shapes}")
  present = stack_mask(mask, names)
  batch = shapes[names[0]][0]
  if present.shape[0] != batch:
    raise ValueError(f"mask has batch size {present.shape[0]} but features have "
                     f"{batch}")
  _check_present(present, names, allow_none)
  x = jnp.stack([jnp.asarray(features[name]) for name in names], axis=1)
  x = jnp.where(present[..., None], x, jnp.zeros((), x.dtype))
  return names, x, present


def combination_index(mask: Mapping[str, Array] | Array) -> Array:
  """Bitmask of the observed modalities: b = sum_i present_i * 2**i.

  Args:
    mask: dict modality -> bool [B] (sorted-name order is used) or bool [B, M].

  Returns:
    int32 [B]; 0 means no modality present, 2**M - 1 all present.
  """
  present = stack_mask(mask)
  powers = 2 ** jnp.arange(present.shape[1], dtype=jnp.int32)
  return jnp.sum(present.astype(jnp.int32) * powers, axis=1)


def restore_one_present(keep: Array, present: Array, score: Array) -> Array:
  """Where `keep` lost every present modality, keep the present argmax of score."""
  lost_all = present.any(axis=1) & ~keep.any(axis=1)
  best = jnp.argmax(jnp.where(present, score, -jnp.inf), axis=1)
  restore = jax.nn.one_hot(best, present.shape[1], dtype=jnp.bool_) & present
  return jnp.where(lost_all[:, None], restore, keep)


def unstack_mask(new: Array, mask: Mapping[str, Array] | Array):
  """`new` bool [B, M] in the structure of `mask` (a dict in sorted order, or as is)."""
  if isinstance(mask, Mapping):
    return {name: new[:, i] for i, name in enumerate(sorted(mask))}
  return new


def modality_dropout(mask: Mapping[str, Array] | Array, rate: float, rng: Array,
                     keep_at_least_one: bool = True):
  """Drops each present modality independently with probability `rate`.

  The trainer applies this to `batch['mask']` during training (fusion modules
  then ignore the dropped inputs exactly as they ignore missing ones).

  Args:
    mask: dict modality -> bool [B] (or bool [B, M]).
    rate: drop probability in [0, 1) (a number, checked, or a scalar array, e.g. a
      schedule's value at a traced step).
    rng: PRNG key.
    keep_at_least_one: when every present modality of a sample was dropped,
      keep one of them, chosen uniformly at random.

  Returns:
    The new mask, same structure as `mask`; it is a subset of `mask`.
  """
  if isinstance(rate, (int, float)) and not 0.0 <= rate < 1.0:
    raise ValueError(f"modality dropout rate must be in [0, 1), got {rate}")
  present = stack_mask(mask)
  u = jax.random.uniform(rng, present.shape)
  keep = present & (u >= rate)
  if keep_at_least_one:
    keep = restore_one_present(keep, present, u)
  return unstack_mask(keep, mask)
