"""Objectives: `config.objective` -> a loss on a `ModelOutput` and its batch.

An objective is `fn(output, batch, objective_config, *, axis_name) -> (loss, metrics)`.
Inside the train step's `shard_map` it must return the *global* loss, identical on
every device (alignment losses gather negatives over `axis_name`; local terms are
`pmean`-ed). Parameters are device-invariant in the step, so the gradient of that
global loss is the global-batch gradient on every device.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mmjax import align

OBJECTIVES: dict[str, Callable] = {}


def register(name: str):
  def wrap(fn):
    OBJECTIVES[name] = fn
    return fn
  return wrap


def get(name: str) -> Callable:
  if name not in OBJECTIVES:
    raise ValueError(f"objective.kind: unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def _pair(output, objective_config):
  names = sorted(output.embeddings)
  if len(names) != 2:
    raise ValueError(f"objective {objective_config.kind!r} aligns two modalities; the model "
                     f"has {names} (use objective.kind='pairwise' or 'gram' for more)")
  return names


@register("clip")
def clip_objective(output, batch, objective_config, *, axis_name=None):
  """Symmetric InfoNCE between the two modalities of the model."""
  a, b = _pair(output, objective_config)
  loss, metrics = align.clip_loss(
      output.embeddings[a], output.embeddings[b], logit_scale=output.logit_scale,
      label_smoothing=objective_config.label_smoothing, axis_name=axis_name)
  return loss, {f"clip/{k}": v for k, v in metrics.items()}


def global_mean(x: jax.Array, axis_name=None) -> jax.Array:
  """Mean of a local per-example quantity over the global batch."""
  m = jnp.mean(x)
  return jax.lax.pmean(m, axis_name) if axis_name else m
