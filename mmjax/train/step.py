"""Train state and the jitted steps: small pure functions of `(state, batch, rng)`.

The per-device body of the train step is written with `jax.shard_map` over every axis
of the mesh (`mmjax.train.mesh`; the batch is split over all of them): each device
gathers the parameters sharded over 'fsdp' (`mmjax.train.sharding`), encodes its block
of the global batch, the objective gathers negatives from all devices and returns the
global loss, and the gradient of that loss with respect to each device's parameter
shard is summed over the devices that share it: reduce-scattered over 'fsdp' (the
transpose of the all-gather) and summed over the other axes. The optimizer update then
runs once, outside `shard_map`, on parameters and optimizer state laid out as the specs
say (GSPMD keeps the layout). On a mesh without an fsdp axis every spec is P() and this
is plain data parallelism.

With `microbatches` or `grad_cache` > 1 each device's block is processed in that many
chunks (`mmjax.train.grad_cache`).
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
from mmjax.models import model as model_lib
from mmjax.train import grad_cache as cache_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import sharding as sharding_lib

DATA = mesh_lib.DATA


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, tx, opt_state)."""


def init_variables(model, sample_batch, rng):
  """Params from a (host, unsharded) sample batch; shapes only matter."""
  return model.init({"params": rng, "dropout": rng}, sample_batch, train=False)


def abstract_params(model, sample_batch):
  """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s), nothing computed;
  `sample_batch` may be arrays or shape structs."""
  return jax.eval_shape(lambda rng, batch: init_variables(model, batch, rng)["params"],
                        jax.random.key(0), sample_batch)


def state_shardings(model, tx, sample_batch, mesh, specs=None):
  """The `NamedSharding`s of a train state whose params are laid out by `specs` (a tree
  of `PartitionSpec`s like the params; None: replicated); the optimizer state follows
  (`sharding.state_specs`)."""
  shapes = jax.eval_shape(
      lambda rng, batch: TrainState.create(apply_fn=model.apply, tx=tx,
                                           params=init_variables(model, batch, rng)["params"]),
      jax.random.key(0), sample_batch)
  if specs is None:
    specs = sharding_lib.replicated_specs(shapes.params)
  return sharding_lib.named(mesh, sharding_lib.state_specs(shapes, specs))


def create_train_state(model, tx: optax.GradientTransformation, sample_batch, rng,
                       mesh, specs=None) -> TrainState:
  """A TrainState on `mesh` (params initialised under jit, no host copy), laid out by
  `specs` (None: replicated; see `state_shardings`)."""

  @functools.partial(jax.jit,
                     out_shardings=state_shardings(model, tx, sample_batch, mesh, specs))
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


def _leaf_specs(params, specs, frozen):
  """(trainable specs, frozen specs), in `partition`'s order."""
  treedef = jax.tree.structure(params)
  leaves = (treedef.flatten_up_to(specs) if specs is not None
            else [P()] * treedef.num_leaves)
  flags = [False] * len(leaves) if frozen is None else treedef.flatten_up_to(frozen)
  return ([s for s, f in zip(leaves, flags) if not f],
          [s for s, f in zip(leaves, flags) if f])


def make_grad_fn(model, objective: Callable, objective_config, mesh, *,
                 deterministic_reductions: bool = False, frozen=None, specs=None,
                 microbatches: int = 1, grad_cache: int = 1) -> Callable:
  """`grad_fn(params, batch, rng, step=None) -> (loss, grads, metrics)`, not jitted on
  its own.

  `step` (an int scalar, the train state's step) goes to the model (`model.apply(...,
  step=step)`, for fusion modules with step-dependent hyperparameters) and to the
  objective (`step=step`); None is what an eval pass sees: schedules take their
  final value (`mmjax.schedules`).

  `batch` is a dict of global arrays split over every mesh axis; the objective's
  `axis_name` is that tuple of axes (`mesh.batch_axes`). The loss and the objective's
  metrics (averaged over devices) are replicated; `grads` are laid out as the params
  (`specs`, a tree of `PartitionSpec`s, None: replicated). With
  `deterministic_reductions`, every sum over devices (the gradient, the objective's
  gathers and sums) goes in device order (`mmjax.collectives`), so the result does not
  depend on how the devices are split into processes.

  `frozen`: a tree of bools like the params (`mmjax.train.optimizer.frozen_mask`), or
  None. Frozen params are constants of the loss: no gradient is computed or summed
  over devices for them, and their entries of `grads` are zeros.

  `microbatches` (plain accumulation, objectives that decompose over examples) or
  `grad_cache` (GradCache, the alignment objectives): each device's block in that many
  chunks, one chunk's activations at a time (`mmjax.train.grad_cache`).
  """
  axes = mesh_lib.batch_axes(mesh)
  if microbatches > 1 and grad_cache > 1:
    raise ValueError(f"microbatches={microbatches} and grad_cache.microbatches="
                     f"{grad_cache}: use one of the two")

  def per_device(join, t_specs, f_specs, trainable, fixed, batch, rng, step=None):
    with collectives.fixed_order(deterministic_reductions):
      return device_step(join, t_specs, f_specs, trainable, fixed, batch, rng, step)

  def device_step(join, t_specs, f_specs, trainable, fixed, batch, rng, step):
    # Different dropout on every device (the flat index over the batch axes, so that
    # data=8 and fsdp=8 draw the same masks), the same on every run.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    # Under deterministic_reductions each trainable shard is typed per-device over the
    # axes it is replicated on, so that its gradient comes out per device and is summed
    # below in device order. Otherwise autodiff's implicit all-reduce sums it (the
    # transpose of using a replicated value on every device), and the shards stay
    # invariant, as an objective's loss may use them outside a reduction.
    summed = [tuple(a for a in axes if a not in sharding_lib.spec_axes(s))
              if deterministic_reductions else () for s in t_specs]
    local = [collectives.vary(x, a) if a else x for x, a in zip(trainable, summed)]
    fixed = [sharding_lib.gather(x, s) for x, s in zip(fixed, f_specs)]
    gather_all = lambda local: [sharding_lib.gather(x, s) for x, s in zip(local, t_specs)]
    full, unshard = jax.vjp(gather_all, local)

    def forward(full, batch, rng):
      return model.apply({"params": join(full, fixed)}, batch, train=True,
                         rngs={"dropout": rng}, step=step)

    def loss_fn(full, batch, rng):
      out = forward(full, batch, rng)
      loss, metrics = objective(out, batch, objective_config, axis_name=axes, step=step)
      return loss, _with_scale(metrics, out)

    if grad_cache > 1:
      def embed(full, batch, rng):
        out = forward(full, batch, rng)
        return out.embeddings, out.logit_scale, out.logit_bias

      def loss_of_embeddings(embeddings, logit_scale, logit_bias, batch):
        out = model_lib.ModelOutput(embeddings=embeddings, features={},
                                    logit_scale=logit_scale, logit_bias=logit_bias)
        loss, metrics = objective(out, batch, objective_config, axis_name=axes, step=step)
        return loss, _with_scale(metrics, out)

      loss, metrics, grads = cache_lib.cached_gradients(
          embed, loss_of_embeddings, full, batch, rng, grad_cache)
    elif microbatches > 1:
      loss, metrics, grads = cache_lib.accumulated_gradients(
          loss_fn, full, batch, rng, microbatches)
    else:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(full, batch, rng)
    (grads,) = unshard(grads)
    grads = [collectives.psum(g, a) if a else g for g, a in zip(grads, summed)]
    return loss, grads, collectives.pmean(metrics, axes)

  def grad_fn(params, batch, rng, step=None):
    trainable, fixed, join = partition(params, frozen)
    t_specs, f_specs = _leaf_specs(params, specs, frozen)
    args = (trainable, fixed, batch, rng) + (() if step is None else (step,))
    in_specs = (t_specs, f_specs, P(axes), P()) + (() if step is None else (P(),))
    loss, grads, metrics = jax.shard_map(
        functools.partial(per_device, join, t_specs, f_specs), mesh=mesh,
        in_specs=in_specs, out_specs=(P(), t_specs, P()))(*args)
    return loss, join(grads, [jnp.zeros_like(x) for x in fixed]), metrics

  return grad_fn


def _with_scale(metrics, out):
  metrics = dict(metrics, logit_scale=out.logit_scale)
  if out.logit_bias is not None:
    metrics["logit_bias"] = out.logit_bias
  return metrics


def make_train_step(model, objective: Callable, objective_config, mesh,
                    *, donate: bool = True, deterministic_reductions: bool = False,
                    frozen=None, update_args: bool = False, specs=None,
                    microbatches: int = 1, grad_cache: int = 1) -> Callable:
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
  `specs`, `microbatches`, `grad_cache`: see `make_grad_fn`; the new state keeps the
  layout of `specs` (params and the optimizer state that follows them).
  """
  grad_fn = make_grad_fn(model, objective, objective_config, mesh,
                         deterministic_reductions=deterministic_reductions, frozen=frozen,
                         specs=specs, microbatches=microbatches, grad_cache=grad_cache)

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
    if specs is not None:
      new_state = jax.lax.with_sharding_constraint(
          new_state, sharding_lib.named(mesh, sharding_lib.state_specs(new_state, specs)))
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
