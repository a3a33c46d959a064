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
import optax

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


@register("task")
def task_objective(output, batch, objective_config, *, axis_name=None):
  """Classification cross-entropy of the task head, plus the fusion's auxiliary losses.

  loss = mean over the global batch of CE(output.logits, batch['label'])
         + every `output.aux['loss/...']` term (already weighted by the fusion module;
           each is a local-batch statistic, averaged over devices).

  Metrics: `task/cross_entropy`, `task/accuracy`, every aux loss under its own name and
  every scalar `stats/...` entry of `aux` (averaged over devices).
  """
  del objective_config
  if output.logits is None:
    raise ValueError("objective.kind='task' needs task logits: set model.fusion and "
                     "model.task (num_classes) in the config")
  if "label" not in batch:
    raise ValueError("objective.kind='task' needs batch['label'], but the data produces "
                     f"only {sorted(k for k in batch if k != 'mask')}; configure a label "
                     "(data.label for the procedural world)")
  logits, labels = output.logits, batch["label"]
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"objective 'task': logits must be [B, C] and labels [B]; got logits "
                     f"{logits.shape}, labels {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"objective 'task': labels must be integer class ids, got {labels.dtype}")
  logits = logits.astype(jnp.float32)
  cross_entropy = global_mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels), axis_name)
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
  return loss, metrics
