"""AdamW with linear warmup, cosine decay and global-norm clipping (optax), then a
clamp of the logit scale's parameter into its range."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from mmjax import align
from mmjax import checks

LOGIT_SCALE_PARAM = "logit_scale"   # the model's log-scale t (mmjax.models.model)


def check_optimizer_config(opt_config, where: str = "optimizer") -> None:
  """Every `config.optimizer` number in its valid range, the message naming it."""
  c = opt_config
  checks.check_range(f"{where}.lr", c.lr, low=0, low_open=True)
  checks.check_rate(f"{where}.min_lr_ratio", c.min_lr_ratio)
  checks.check_count(f"{where}.warmup_steps", c.warmup_steps, low=0)
  checks.check_range(f"{where}.weight_decay", c.weight_decay, low=0)
  checks.check_range(f"{where}.b1", c.b1, low=0, high=1, high_open=True)
  checks.check_range(f"{where}.b2", c.b2, low=0, high=1, high_open=True)
  checks.check_range(f"{where}.eps", c.eps, low=0, low_open=True)
  checks.check_range(f"{where}.clip_norm", c.clip_norm, low=0, low_open=True)


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  c = opt_config
  check_optimizer_config(c)
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only: no decay on biases, norms, scalars (logit scale)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def clamp_param(name: str, low: float, high: float) -> optax.GradientTransformation:
  """Keeps the top-level scalar `params[name]` in [low, high] after each update.

  The update u of that leaf becomes clip(p + u, low, high) - p, so that
  `optax.apply_updates` lands on the clipped value; every other leaf is unchanged.
  The clip acts on the parameter, not on its gradient: a parameter held at `high`
  moves down as soon as an update points down. Apply it last (it needs the final
  updates) and pass `params` to `update`. Stateless (`optax.EmptyState`).
  """
  if not low <= high:
    raise ValueError(f"clamp_param({name!r}): low {low} > high {high}")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f"clamp_param({name!r}) needs the params: call "
                       f"tx.update(grads, opt_state, params)")
    found = []

    def clamp(path, u, p):
      if len(path) == 1 and getattr(path[0], "key", None) == name:
        found.append(path)
        return (jnp.clip(p + u, low, high) - p).astype(u.dtype)
      return u

    updates = jax.tree_util.tree_map_with_path(clamp, updates, params)
    if not found:
      keys = sorted(params) if hasattr(params, "keys") else type(params).__name__
      raise ValueError(f"clamp_param: the params have no top-level leaf {name!r} "
                       f"(top level: {keys})")
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def clamp_logit_scale(max_logit_scale: float) -> optax.GradientTransformation:
  """open_clip's clamp of the log-scale t into [0, log max_logit_scale] (scale in
  [1, max_logit_scale]) after each step, as an optax transformation."""
  if isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, (int, float)):
    raise ValueError(f"model.max_logit_scale must be a number > 1 or None (no clamp), "
                     f"got {max_logit_scale!r}")
  if not math.isfinite(max_logit_scale) or max_logit_scale <= 1.0:
    raise ValueError(f"model.max_logit_scale must be a finite number > 1 (the clamp "
                     f"keeps t in [0, log max_logit_scale]) or None (no clamp), got "
                     f"{max_logit_scale}")
  return clamp_param(LOGIT_SCALE_PARAM, 0.0, math.log(max_logit_scale))


def make_optimizer(opt_config, total_steps: int, *,
                   max_logit_scale: Optional[float] = align.MAX_LOGIT_SCALE
                   ) -> optax.GradientTransformation:
  """`config.optimizer` -> AdamW chain; `max_logit_scale` (`config.model.max_logit_scale`,
  None: no clamp) applies `clamp_logit_scale` last, for params with a 'logit_scale' leaf.

  The optimizer state is the AdamW chain's with or without the clamp (which has none),
  so checkpoints restore across the two.
  """
  c = opt_config
  tx = optax.chain(
      optax.clip_by_global_norm(c.clip_norm),
      optax.adamw(learning_rate_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                  weight_decay=c.weight_decay, mask=_decay_mask))
  if max_logit_scale is None:
    return tx
  return _then_stateless(tx, clamp_logit_scale(max_logit_scale))


def _then_stateless(tx: optax.GradientTransformation,
                    post: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` followed by the stateless `post`, with `tx`'s state as the whole state (unlike
  `optax.chain`, which would add an element to the state tuple)."""

  def update_fn(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    updates, _ = post.update(updates, post.init(params), params)
    return updates, state

  return optax.GradientTransformation(tx.init, update_fn)
