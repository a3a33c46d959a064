"""AdamW with linear warmup, cosine decay and global-norm clipping (optax), then a
clamp of the logit scale's parameter into its range; optionally per-part rules that
freeze parameters or scale their learning rate (`config.optimizer.rules`).

Rules. `config.optimizer.rules` is a tuple of pairs `(pattern, action)`:

  pattern  a Python regular expression over a parameter's path, the '/'-joined keys of
           the params tree ('towers_image/encoder/block_0/attn/query/kernel',
           'heads_text/proj/kernel', 'logit_scale'). It names a subtree: it must match
           the whole path or the path up to a '/' ('towers_image' names the whole image
           tower, 'towers_.*/encoder/block_0' the first block of every tower).
  action   'frozen' (the parameter never changes and has no optimizer state), or a
           learning-rate multiplier > 0 (the parameter's AdamW update, weight decay
           included, is multiplied by it: the parameter trains at lr x multiplier).

Each parameter takes the first rule that matches its path; parameters no rule matches
train at lr x 1. A rule that takes no parameter (it matches no path, or only paths an
earlier rule took) is an error naming it. With LoRA (`adapters`, the params' key of the
adapters) two rules follow the config's: the adapters train at lr x 1, and every other
parameter is frozen, so a config rule may still train a part of the base model (a
head, the logit scale) next to the adapters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from mmjax import align
from mmjax import checks

LOGIT_SCALE_PARAM = "logit_scale"   # the model's log-scale t (mmjax.models.model)
FROZEN = "frozen"                   # a rule's action, and the label of frozen params
TRAINED = "trained"                 # the label of every other param (multi_transform)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule: the params whose path `pattern` names are frozen (`lr_mult` None) or
  train at `lr_mult` x the learning rate. `where` names the rule in messages; a rule
  that is not `required` may take no parameter."""
  pattern: str
  lr_mult: Optional[float]
  where: str
  required: bool = True

  def __post_init__(self):
    try:
      regex = re.compile(f"(?:{self.pattern})(?:/.*)?", re.DOTALL)
    except re.error as e:
      raise ValueError(f"{self.where}: pattern {self.pattern!r} is not a regular "
                       f"expression ({e})") from None
    object.__setattr__(self, "_regex", regex)

  def matches(self, path: str) -> bool:
    return self._regex.fullmatch(path) is not None

  @property
  def action(self):
    return FROZEN if self.lr_mult is None else self.lr_mult


def parse_rules(rules, where: str = "optimizer.rules") -> tuple[Rule, ...]:
  """`config.optimizer.rules` (pairs `(pattern, 'frozen' | lr_mult)`) -> `Rule`s, each
  checked: a non-empty pattern that compiles, and 'frozen' or a finite number > 0."""
  if rules is None:
    return ()
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
    raise ValueError(f"{where} must be a tuple of (pattern, 'frozen' or lr_mult) pairs, "
                     f"got {rules!r}")
  parsed = []
  for i, rule in enumerate(rules):
    here = f"{where}[{i}]"
    if isinstance(rule, (str, bytes)) or not isinstance(rule, (tuple, list)) or len(
        rule) != 2:
      raise ValueError(f"{here} must be a pair (pattern, 'frozen' or a learning-rate "
                       f"multiplier > 0), got {rule!r}")
    pattern, action = rule
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{here}: the pattern must be a non-empty string (a regular "
                       f"expression over '/'-joined parameter paths), got {pattern!r}")
    if isinstance(action, str):
      if action != FROZEN:
        raise ValueError(f"{here} ({pattern!r}): action {action!r} is neither "
                         f"{FROZEN!r} nor a learning-rate multiplier > 0")
      parsed.append(Rule(pattern, None, here))
      continue
    if (isinstance(action, bool) or not isinstance(action, numbers.Real)
        or not math.isfinite(action) or action <= 0):
      raise ValueError(f"{here} ({pattern!r}): the learning-rate multiplier must be a "
                       f"finite number > 0 ({FROZEN!r} freezes), got {action!r}")
    parsed.append(Rule(pattern, float(action), here))
  return tuple(parsed)


def adapter_rules(adapters: Optional[str]) -> tuple[Rule, ...]:
  """The rules LoRA adds after the config's: the adapters (the params' top-level key
  `adapters`) train at lr x 1, every other parameter is frozen. () when None."""
  if adapters is None:
    return ()
  return (Rule(re.escape(adapters), 1.0, "model.lora (the adapters train)", False),
          Rule(".*", None, "model.lora (the base params are frozen)", False))


def optimizer_rules(opt_config, adapters: Optional[str] = None) -> tuple[Rule, ...]:
  """The rules of a run: `opt_config.rules`, then `adapter_rules(adapters)`."""
  return parse_rules(opt_config.get("rules", ())) + adapter_rules(adapters)


def param_path(path) -> str:
  """A tree path (jax key entries) as the '/'-joined keys the rules match."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _example_paths(paths: list[str], limit: int = 24) -> str:
  """The distinct first two levels of `paths`, as a hint of what rules can name."""
  heads = list(dict.fromkeys("/".join(p.split("/")[:2]) for p in paths))
  more = f", ... ({len(heads) - limit} more)" if len(heads) > limit else ""
  return ", ".join(heads[:limit]) + more


def multipliers(rules, tree):
  """Each leaf of `tree` (the params, their gradients or updates) -> its learning-rate
  multiplier: 0.0 when frozen, the first matching rule's `lr_mult`, else 1.0.

  Raises:
    ValueError: a required rule takes no parameter (the message names the rule and
      shows the params' paths).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [param_path(path) for path, _ in flat]
  taken = [0] * len(rules)
  matched = [0] * len(rules)
  mults = []
  for path in paths:
    mult = 1.0
    first = None
    for i, rule in enumerate(rules):
      if rule.matches(path):
        matched[i] += 1
        if first is None:
          first = i
    if first is not None:
      taken[first] += 1
      mult = 0.0 if rules[first].lr_mult is None else rules[first].lr_mult
    mults.append(mult)
  for i, rule in enumerate(rules):
    if rule.required and not taken[i]:
      why = ("every parameter it matches is taken by an earlier rule (the first "
             "matching rule wins)" if matched[i] else "it matches no parameter path")
      raise ValueError(
          f"{rule.where} ({rule.pattern!r}, {rule.action!r}) applies to no parameter: "
          f"{why}. A pattern names a subtree of '/'-joined keys; the params start "
          f"with: {_example_paths(paths)}")
  return treedef.unflatten(mults)


def frozen_mask(opt_config, params, *, adapters: Optional[str] = None):
  """A tree of bools like `params` (True: frozen by the rules), or None when the rules
  freeze nothing. For the train step (`mmjax.train.step.make_train_step`)."""
  rules = optimizer_rules(opt_config, adapters)
  if not any(r.lr_mult is None for r in rules):
    multipliers(rules, params)     # the same errors as the optimizer's
    return None
  mask = jax.tree.map(lambda m: m == 0.0, multipliers(rules, params))
  return mask if any(jax.tree.leaves(mask)) else None


def check_optimizer_config(opt_config, where: str = "optimizer") -> None:
  """Every `config.optimizer` number in its valid range, the message naming it; the
  rules' syntax (whether they match parameters is checked when the state is built)."""
  c = opt_config
  checks.check_range(f"{where}.lr", c.lr, low=0, low_open=True)
  checks.check_rate(f"{where}.min_lr_ratio", c.min_lr_ratio)
  checks.check_count(f"{where}.warmup_steps", c.warmup_steps, low=0)
  checks.check_range(f"{where}.weight_decay", c.weight_decay, low=0)
  checks.check_range(f"{where}.b1", c.b1, low=0, high=1, high_open=True)
  checks.check_range(f"{where}.b2", c.b2, low=0, high=1, high_open=True)
  checks.check_range(f"{where}.eps", c.eps, low=0, low_open=True)
  checks.check_range(f"{where}.clip_norm", c.clip_norm, low=0, low_open=True)
  parse_rules(c.get("rules", ()), where=f"{where}.rules")


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



def with_rules(tx: optax.GradientTransformation, rules, *,
               then: Optional[optax.GradientTransformation] = None
               ) -> optax.GradientTransformation:
  """`tx` on the parameters `rules` do not freeze, then each update x its parameter's
  multiplier, then the stateless `then` (the logit-scale clamp); frozen parameters get
  a zero update at the end, whatever `then` does.

  With a frozen rule, `tx` runs inside `optax.multi_transform` on the trained
  parameters only (frozen ones take `optax.set_to_zero()`), so the state holds no
  moments for frozen parameters and a global-norm clip in `tx` sees trained gradients
  only. The multipliers (`optax.masked(optax.scale(m), ...)`) and `then` are stateless
  and keep no state: the state depends on which parameters are frozen, not on the
  multipliers, so changing a multiplier keeps checkpoints restorable (as changing
  `lr` does). Without a frozen rule the state is `tx`'s own.
  """
  rules = tuple(rules)
  post = []
  for mult in sorted({r.lr_mult for r in rules if r.lr_mult not in (None, 1.0)}):
    post.append(optax.masked(
        optax.scale(mult),
        lambda tree, m=mult: jax.tree.map(lambda x: x == m, multipliers(rules, tree))))
  if then is not None:
    post.append(then)
  if any(r.lr_mult is None for r in rules):
    frozen = lambda tree: jax.tree.map(lambda m: m == 0.0, multipliers(rules, tree))
    labels = lambda tree: jax.tree.map(lambda m: FROZEN if m == 0.0 else TRAINED,
                                       multipliers(rules, tree))
    tx = optax.multi_transform({FROZEN: optax.set_to_zero(), TRAINED: tx}, labels)
    if then is not None:
      post.append(optax.masked(optax.set_to_zero(), frozen))
  elif rules:
    tx = _checking(tx, rules)
  if not post:
    return tx
  return _then_stateless(tx, optax.chain(*post))


def _checking(tx: optax.GradientTransformation, rules) -> optax.GradientTransformation:
  """`tx`, whose `init` also checks that every rule takes a parameter."""

  def init_fn(params):
    multipliers(rules, params)
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)


def make_optimizer(opt_config, total_steps: int, *,
                   max_logit_scale: Optional[float] = align.MAX_LOGIT_SCALE,
                   adapters: Optional[str] = None) -> optax.GradientTransformation:
  """`config.optimizer` -> AdamW chain; `max_logit_scale` (`config.model.max_logit_scale`,
  None: no clamp) applies `clamp_logit_scale` last, for params with a 'logit_scale' leaf.
  `opt_config.rules` freeze parameters or scale their learning rate (`with_rules`, the
  module docstring); `adapters` (the params' key of LoRA adapters, or None) trains the
  adapters and freezes every parameter the rules do not name.

  The optimizer state is the AdamW chain's with or without the clamp (which has none),
  so checkpoints restore across the two; rules that only scale learning rates keep that
  state too. With frozen parameters it is `optax.multi_transform`'s, holding the AdamW
  chain's state of the trained parameters only.
  """
  c = opt_config
  tx = optax.chain(
      optax.clip_by_global_norm(c.clip_norm),
      optax.adamw(learning_rate_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                  weight_decay=c.weight_decay, mask=_decay_mask))
  clamp = None if max_logit_scale is None else clamp_logit_scale(max_logit_scale)
  rules = optimizer_rules(c, adapters)
  if rules:
    return with_rules(tx, rules, then=clamp)
  if clamp is None:
    return tx
  return _then_stateless(tx, clamp)


def _then_stateless(tx: optax.GradientTransformation,
                    post: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` followed by the stateless `post`, with `tx`'s state as the whole state (unlike
  `optax.chain`, which would add an element to the state tuple)."""

  def update_fn(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    updates, _ = post.update(updates, post.init(updates), params)
    return updates, state

  return optax.GradientTransformation(tx.init, update_fn)
