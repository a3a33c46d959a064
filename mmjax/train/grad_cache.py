"""Larger batches than one device's activations hold: gradients in chunks.

Two ways, chosen by the config (one at a time; docs/scaling.md):

  config.microbatches = k        plain accumulation, for objectives whose loss is a mean
                                 over examples ('task'): each device's block in k equal
                                 chunks, the gradient the mean of the chunks' gradients.
                                 Exact for the cross-entropy; a fusion module's auxiliary
                                 losses are statistics of each chunk, averaged.
  config.grad_cache.microbatches = k
                                 GradCache (Gao et al. 2021, "Scaling Deep Metric Learning
                                 Beyond the GPU Memory Limit"), for the alignment
                                 objectives, whose loss compares every example with the
                                 whole global batch and so does not split into chunks:
                                   1. embed the k chunks one after the other, keeping only
                                      the embeddings (no activations, no gradient);
                                   2. the global loss of all the embeddings (the objective
                                      gathers over devices as usual) and its gradient with
                                      respect to the embeddings and the logit scale / bias;
                                   3. each chunk embedded again under `jax.vjp`, pulled
                                      back with its slice of that gradient; the parameter
                                      gradients summed over chunks.
                                 The same gradient as the whole block at once (the chain
                                 rule, summed in another order), with one chunk's
                                 activations live at a time, for one more forward pass.

Chunk i of a device draws its dropout from `fold_in(device_key, i)`, in both passes of
GradCache, so the two passes see the same masks. The chunks are a `lax.scan`: the
compiled step holds one chunk's temporaries.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# The objectives GradCache serves: their loss reads only the embeddings, the logit scale
# and the logit bias of the model's output.
GRAD_CACHE_OBJECTIVES = ("clip", "siglip", "pairwise", "gram")
# The objectives plain accumulation is exact for: a mean over examples.
DECOMPOSABLE_OBJECTIVES = ("task",)


def _count(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{field} must be an int >= 1 (1: the whole block at once), "
                     f"got {value!r}")
  return value


def check_config(config, num_devices: int) -> None:
  """`config.microbatches` and `config.grad_cache.microbatches` against the objective
  and the per-device batch (`config.batch_size` over `num_devices`).

  Raises:
    ValueError: a count that is not an int >= 1, both set, a count that does not divide
      the per-device batch, plain accumulation of an objective that does not decompose
      over examples (naming grad_cache), GradCache of an objective it cannot serve.
  """
  plain = _count(config.get("microbatches", 1), "microbatches")
  cached = _count(config.grad_cache.get("microbatches", 1), "grad_cache.microbatches")
  if plain > 1 and cached > 1:
    raise ValueError(f"config.microbatches={plain} and config.grad_cache.microbatches="
                     f"{cached}: set one of them (microbatches for 'task', grad_cache for "
                     "the alignment objectives)")
  per_device = config.batch_size // num_devices
  terms = str(config.objective.kind).split("+")
  for field, k in (("microbatches", plain), ("grad_cache.microbatches", cached)):
    if k > 1 and per_device % k:
      raise ValueError(f"config.{field}={k} does not divide the per-device batch of "
                       f"{per_device} (batch_size {config.batch_size} over {num_devices} "
                       "devices); the chunks must be equal")
  if plain > 1:
    other = [t for t in terms if t not in DECOMPOSABLE_OBJECTIVES]
    if other:
      raise ValueError(
          f"config.microbatches={plain}: plain accumulation is exact only for objectives "
          f"that average over examples ({list(DECOMPOSABLE_OBJECTIVES)}); objective.kind "
          f"{config.objective.kind!r} compares each example with the whole batch "
          f"({other}), so its chunks' gradients do not add up to the batch's. Use "
          f"config.grad_cache.microbatches={plain} (GradCache) instead")
  if cached > 1:
    other = [t for t in terms if t not in GRAD_CACHE_OBJECTIVES]
    if other:
      hint = ("; for 'task' use config.microbatches" if other == ["task"] else
              " ('matching' scores re-paired encoder features with the matching head, "
              "which grad_cache does not cache)" if "matching" in other else "")
      raise ValueError(
          f"config.grad_cache.microbatches={cached}: GradCache serves the objectives "
          f"{list(GRAD_CACHE_OBJECTIVES)}, whose loss reads only the embeddings and the "
          f"logit scale and bias; objective.kind {config.objective.kind!r} has {other}"
          + hint)


def split(batch, k: int):
  """Every leaf [b, ...] -> [k, b / k, ...] (chunk i holds rows i*b/k .. (i+1)*b/k)."""
  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"{k} microbatches do not divide the per-device batch of "
                       f"{x.shape[0]} rows")
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])
  return jax.tree.map(one, batch)


def _merge(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _add(total, part):
  return jax.tree.map(jnp.add, total, part)


def accumulated_gradients(loss_fn: Callable, params, batch, rng, k: int):
  """(loss, metrics, grads) of `loss_fn(params, chunk, rng) -> (loss, metrics)` as the
  mean over k equal chunks of `batch` (per device, inside `shard_map`)."""
  chunks = split(batch, k)

  def body(total, xs):
    chunk, i = xs
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, chunk, jax.random.fold_in(rng, i))
    return _add(total, grads), (loss, metrics)

  grads, (losses, metrics) = jax.lax.scan(
      body, jax.tree.map(jnp.zeros_like, params), (chunks, jnp.arange(k)))
  mean = lambda x: jnp.mean(x, axis=0)
  return mean(losses), jax.tree.map(mean, metrics), jax.tree.map(lambda g: g / k, grads)


def cached_gradients(embed: Callable, loss_of_embeddings: Callable, params, batch, rng,
                     k: int):
  """GradCache (module doc), per device inside `shard_map`.

  Args:
    embed: `(params, chunk, rng) -> (embeddings, logit_scale, logit_bias)`, the model's
      forward pass (embeddings: modality -> [rows, D]; logit_bias may be None).
    loss_of_embeddings: `(embeddings, logit_scale, logit_bias, batch) -> (loss,
      metrics)`, the objective on the whole block's embeddings (the global loss).
    params, batch, rng: the (gathered) params, this device's block, its key.
    k: the number of chunks.

  Returns:
    (loss, metrics, grads), grads with respect to `params` summed over the chunks.
  """
  chunks, index = split(batch, k), jnp.arange(k)
  chunk_key = lambda i: jax.random.fold_in(rng, i)

  # 1. Every chunk's embeddings, one chunk at a time; nothing kept for a backward pass.
  embeddings, scales, biases = jax.lax.map(
      lambda xs: embed(params, xs[0], chunk_key(xs[1])), (chunks, index))
  embeddings = jax.tree.map(_merge, embeddings)
  scale = scales[0]
  bias = None if biases is None else biases[0]

  # 2. The global loss and its gradient with respect to what the objective read.
  (loss, metrics), (d_embeddings, d_scale, d_bias) = jax.value_and_grad(
      loss_of_embeddings, argnums=(0, 1, 2), has_aux=True)(embeddings, scale, bias, batch)

  # 3. Each chunk again, pulled back with its slice of the cotangent. The logit scale
  #    and bias are the same parameters in every chunk: their cotangent goes to the
  #    first chunk's pass alone.
  def body(total, xs):
    chunk, i, d_chunk = xs
    _, pull_back = jax.vjp(lambda p: embed(p, chunk, chunk_key(i)), params)
    first = (i == 0).astype(d_scale.dtype)
    (grads,) = pull_back((d_chunk, d_scale * first,
                          None if d_bias is None else d_bias * first))
    return _add(total, grads), None

  grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                          (chunks, index, split(d_embeddings, k)))
  return loss, metrics, grads
