"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  c = opt_config
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only: no decay on biases, norms, scalars (logit scale)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
  c = opt_config
  return optax.chain(
      optax.clip_by_global_norm(c.clip_norm),
      optax.adamw(learning_rate_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                  weight_decay=c.weight_decay, mask=_decay_mask))
