"""Train state and the jitted steps: small pure functions of `(state, batch, rng)`.

The per-device body of the train step is written with `jax.shard_map` over the mesh
axis 'data' (the pmap programming model): each device encodes its block of the
global batch, the objective gathers negatives from all devices and returns the
global loss, and the gradient of that loss with respect to the replicated params is
the global-batch gradient (autodiff sums the per-device contributions: the transpose
of using a replicated value on every device is a `psum`). The optimizer update then
runs once on the replicated params and optimizer state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import collectives

DATA = "data"


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, tx, opt_state)."""


def init_variables(model, sample_batch, rng):
  """Params from a (host, unsharded) sample batch; shapes only matter."""
  return model.init({"params": rng, "dropout": rng}, sample_batch, train=False)


def create_train_state(model, tx: optax.GradientTransformation, sample_batch, rng,
                       mesh) -> TrainState:
  """A replicated TrainState on `mesh` (params initialised under jit, no host copy)."""
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(rng):
    params = init_variables(model, sample_batch, rng)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return init(rng)


def partition(params, frozen):
  """(trainable leaves, frozen leaves, join) of `params` by the bool tree `frozen`
  (None: every leaf trainable); `join(trainable, fixed)` rebuilds the params tree."""
  leaves, treedef = jax.tree.flatten(params)
  flags = [False] * len(leaves) if frozen is None else treedef.flatten_up_to(frozen)
  trainable = [x for x, f in zip(leaves, flags) if not f]
  fixed = [x for x, f in zip(leaves, flags) if f]

  def join(trainable, fixed):
    trainable, fixed = iter(trainable), iter(fixed)
    return treedef.unflatten([next(fixed) if f else next(trainable) for f in flags])

  return trainable, fixed, join


def make_grad_fn(model, objective: Callable, objective_config, mesh, *,
                 deterministic_reductions: bool = False, frozen=None) -> Callable:
  """`grad_fn(params, batch, rng, step=None) -> (loss, grads, metrics)`, not jitted on
  its own.

  `step` (an int scalar, the train state's step) goes to the model (`model.apply(...,
  step=step)`, for fusion modules with step-dependent hyperparameters) and to the
  objective (`step=step`); None is what an eval pass sees: schedules take their
  final value (`mmjax.schedules`).

  `batch` is a dict of global arrays sharded over 'data'; the outputs are replicated:
  the global loss, its gradient, and the objective's metrics averaged over devices.
  With `deterministic_reductions`, every sum over devices (the gradient, the
  objective's gathers and sums) goes in device order (`mmjax.collectives`), so the
  result does not depend on how the devices are split into processes.

  `frozen`: a tree of bools like the params (`mmjax.train.optimizer.frozen_mask`), or
  None. Frozen params are constants of the loss: no gradient is computed or summed
  over devices for them, and their entries of `grads` are zeros.
  """

  def per_device(join, trainable, fixed, batch, rng, step=None):
    with collectives.fixed_order(deterministic_reductions):
      return device_step(join, trainable, fixed, batch, rng, step)

  def device_step(join, trainable, fixed, batch, rng, step):
    # Different dropout on every device, the same on every run.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA))
    if deterministic_reductions:
      # Per-device gradients, summed below in device order rather than by the
      # all-reduce autodiff puts where replicated params meet per-device data.
      trainable = collectives.vary(trainable, DATA)

    def loss_fn(trainable):
      out = model.apply({"params": join(trainable, fixed)}, batch, train=True,
                        rngs={"dropout": rng}, step=step)
      loss, metrics = objective(out, batch, objective_config, axis_name=DATA, step=step)
      metrics["logit_scale"] = out.logit_scale
      if out.logit_bias is not None:
        metrics["logit_bias"] = out.logit_bias
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    if deterministic_reductions:
      grads = collectives.psum(grads, DATA)
    return loss, grads, collectives.pmean(metrics, DATA)

  def grad_fn(params, batch, rng, step=None):
    trainable, fixed, join = partition(params, frozen)
    args = (trainable, fixed, batch, rng) + (() if step is None else (step,))
    specs = (P(), P(), P(DATA), P()) + (() if step is None else (P(),))
    loss, grads, metrics = jax.shard_map(
        functools.partial(per_device, join), mesh=mesh, in_specs=specs,
        out_specs=(P(), P(), P()))(*args)
    return loss, join(grads, [jnp.zeros_like(x) for x in fixed]), metrics

  return grad_fn


def make_train_step(model, objective: Callable, objective_config, mesh,
                    *, donate: bool = True, deterministic_reductions: bool = False,
                    frozen=None, update_args: bool = False) -> Callable:
  """`train_step(state, batch, rng) -> (state, metrics)`, jitted.

  `metrics` are replicated scalars: `loss`, `grad_norm`, `logit_scale` and the
  objective's own metrics. The model and the objective see `step=state.step` (the
  updates applied before this one). `deterministic_reductions`: see `make_grad_fn`.
  `frozen` (a tree of bools like the params, or None): those params get no gradient
  (`make_grad_fn`) and leave the step as they came in, bit for bit (the optimizer
  gives them no state: `mmjax.train.optimizer`).
  `update_args`: the optimizer (an `optax.GradientTransformationExtraArgs`, e.g. a chain
  that starts with a gradient-balancing transformation) is updated with the extra
  arguments `metrics` (this step's replicated metrics), `step` (`state.step`) and `rng`
  (this step's key); transformations that take no extra arguments ignore them.
  """
  grad_fn = make_grad_fn(model, objective, objective_config, mesh,
                         deterministic_reductions=deterministic_reductions, frozen=frozen)

  def train_step(state: TrainState, batch, rng):
    loss, grads, metrics = grad_fn(state.params, batch, rng, state.step)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if update_args:
      updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                           metrics=metrics, step=state.step, rng=rng)
      new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                params=optax.apply_updates(state.params, updates))
    else:
      new_state = state.apply_gradients(grads=grads)
    if frozen is not None:
      new_state = new_state.replace(params=jax.tree.map(
          lambda f, old, new: old if f else new, frozen, state.params, new_state.params))
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_apply_fn(model) -> Callable:
  """`apply(params, batch) -> ModelOutput` in eval mode, jitted (GSPMD over the batch
  sharding; no collectives are needed to embed)."""

  @jax.jit
  def apply(params, batch):
    return model.apply({"params": params}, batch, train=False)

  return apply


def abstract_state(state: TrainState) -> Any:
  """Shapes, dtypes and shardings of a state: the target for a checkpoint restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, state)


def is_finite(x) -> bool:
  return bool(jnp.all(jnp.isfinite(x)))
