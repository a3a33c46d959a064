"""CLIP, SigLIP and pairwise losses: direct formulas, 1 vs 8 devices, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import align
from mmjax.align import contrastive


def _unit(key, shape):
  v = jax.random.normal(key, shape)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _pair(seed, batch, width=4):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = _unit(kx, (batch, width))
  # Correlated with x so that accuracies are neither 0 nor 1.
  y = _unit(ky, (batch, width)) + 0.8 * x
  return x, y / jnp.linalg.norm(y, axis=1, keepdims=True)


def _close(a, b, atol=1e-5, rtol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol,
                               rtol=rtol)


# Direct, slow formulas: an explicit loop over the rows of the logit matrix.


def _clip_direct(x, y, scale, eps):
  batch = x.shape[0]
  total = 0.0
  for i in range(batch):
    target = jnp.full((batch,), eps / batch).at[i].add(1.0 - eps)
    # Row i of x -> y (x_i against every y_j) and row i of y -> x.
    for logits in (scale * (y @ x[i]), scale * (x @ y[i])):
      total -= jnp.dot(target, logits - jax.scipy.special.logsumexp(logits))
  return total / (2 * batch)


def _siglip_direct(x, y, scale, bias):
  batch = x.shape[0]
  total = 0.0
  for i in range(batch):
    z = 2.0 * (jnp.arange(batch) == i) - 1.0
    total -= jnp.sum(jax.nn.log_sigmoid(z * (scale * (y @ x[i]) + bias)))
  return total / batch


def _accuracies_direct(x, y):
  """Fractions of rows / columns whose positive strictly beats the rest."""
  sim = np.asarray(x) @ np.asarray(y).T
  batch = sim.shape[0]
  rows = [all(sim[i, i] > sim[i, j] for j in range(batch) if j != i)
          for i in range(batch)]
  columns = [all(sim[j, j] > sim[i, j] for i in range(batch) if i != j)
             for j in range(batch)]
  return np.mean(rows), np.mean(columns)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_matches_direct_formula(eps):
  x, y = _pair(0, 6)
  scale = jnp.float32(3.0)
  loss_fn = lambda x, y, s: align.clip_loss(x, y, logit_scale=s,
                                            label_smoothing=eps)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2), has_aux=True))(x, y, scale)
  direct, direct_grads = jax.jit(jax.value_and_grad(
      _clip_direct, argnums=(0, 1, 2)), static_argnums=3)(x, y, scale, eps)
  _close(loss, direct)
  _close(grads, direct_grads)
  x_to_y, y_to_x = _accuracies_direct(x, y)
  assert 0 < x_to_y < 1
  _close([metrics["x->y/accuracy"], metrics["y->x/accuracy"],
          metrics["accuracy"], metrics["loss"],
          metrics["mean_positive_similarity"]],
         [x_to_y, y_to_x, (x_to_y + y_to_x) / 2, direct,
          np.mean(np.sum(np.asarray(x * y), axis=1))])


def test_siglip_matches_direct_formula():
  x, y = _pair(1, 6)
  args = (x, y, jnp.float32(5.0), jnp.float32(-2.0))
  loss_fn = lambda x, y, s, b: align.siglip_loss(x, y, logit_scale=s,
                                                 logit_bias=b)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  direct, direct_grads = jax.jit(jax.value_and_grad(
      _siglip_direct, argnums=(0, 1, 2, 3)))(*args)
  _close(loss, direct)
  _close(grads, direct_grads)
  x_to_y, y_to_x = _accuracies_direct(x, y)
  _close([metrics["x->y/accuracy"], metrics["y->x/accuracy"]],
         [x_to_y, y_to_x])


def test_perfect_alignment_has_full_accuracy():
  x = jnp.eye(4)
  _, clip_metrics = align.clip_loss(x, x, logit_scale=10.0)
  _, siglip_metrics = align.siglip_loss(x, x, logit_scale=10.0,
                                        logit_bias=-5.0)
  assert clip_metrics["accuracy"] == 1.0
  assert siglip_metrics["accuracy"] == 1.0


def _on_mesh(loss_fn, mesh):
  """loss_fn(x, y, *scalars, axis_name) as one jitted shard_map + its grad."""
  def sharded(x, y, *scalars):
    return jax.shard_map(
        lambda x, y, *s: loss_fn(x, y, *s, axis_name="data"), mesh=mesh,
        in_specs=(P("data"), P("data")) + (P(),) * len(scalars),
        out_specs=P())(x, y, *scalars)
  return jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3),
                                    has_aux=True))


def _single(loss_fn):
  return jax.jit(jax.value_and_grad(
      lambda *a: loss_fn(*a, axis_name=None), argnums=(0, 1, 2, 3),
      has_aux=True))


def _clip(x, y, scale, unused, axis_name):
  del unused
  return align.clip_loss(x, y, logit_scale=scale, label_smoothing=0.1,
                         axis_name=axis_name)


def _siglip(x, y, scale, bias, axis_name):
  return align.siglip_loss(x, y, logit_scale=scale, logit_bias=bias,
                           axis_name=axis_name)


def _siglip_all_gather(x, y, scale, bias, axis_name):
  return contrastive.siglip_loss_all_gather(x, y, logit_scale=scale,
                                            logit_bias=bias,
                                            axis_name=axis_name)


@pytest.mark.parametrize("loss_fn", [_clip, _siglip, _siglip_all_gather],
                         ids=["clip", "siglip_ring", "siglip_all_gather"])
def test_eight_devices_match_one(loss_fn, mesh8):
  """Values, metrics and gradients (x, y, scale, bias) on 8 devices vs 1."""
  x, y = _pair(2, 16)
  args = (x, y, jnp.float32(4.0), jnp.float32(-1.5))
  (loss8, metrics8), grads8 = _on_mesh(loss_fn, mesh8)(*args)
  (loss1, metrics1), grads1 = _single(loss_fn)(*args)
  _close(loss8, loss1)
  _close(metrics8, metrics1)
  _close(grads8, grads1)
  assert 0 < metrics1["accuracy"] < 1


def test_siglip_ring_on_one_device_mesh(mesh1):
  x, y = _pair(8, 6)
  args = (x, y, jnp.float32(4.0), jnp.float32(-1.5))
  (loss_mesh, _), grads_mesh = _on_mesh(_siglip, mesh1)(*args)
  loss = _siglip_direct(*args)
  _close(loss_mesh, loss)
  _close(grads_mesh, _single(_siglip)(*args)[1])


def test_siglip_ring_equals_all_gather(mesh8):
  x, y = _pair(3, 16)
  args = (x, y, jnp.float32(10.0), jnp.float32(-10.0))
  (ring_loss, ring_metrics), ring_grads = _on_mesh(_siglip, mesh8)(*args)
  (gather_loss, gather_metrics), gather_grads = _on_mesh(
      _siglip_all_gather, mesh8)(*args)
  _close(ring_loss, gather_loss)
  _close(ring_metrics, gather_metrics)
  _close(ring_grads, gather_grads)


@pytest.mark.parametrize("kind, check_vma", [("clip", True), ("siglip", True),
                                             ("siglip", False)])
def test_trainer_pmean_of_param_grads_is_global_grad(kind, check_vma, mesh8):
  """grad in shard_map w.r.t. replicated params, then pmean = global grad."""
  x, y = _pair(4, 16)
  params = {"w": jax.random.normal(jax.random.key(5), (4, 4)) * 0.5,
            "t": jnp.float32(math.log(5.0))}

  def loss(params, x, y, axis_name):
    kwargs = dict(logit_scale=jnp.exp(params["t"]), axis_name=axis_name)
    if kind == "clip":
      return align.clip_loss(x @ params["w"], y, **kwargs)[0]
    return align.siglip_loss(x @ params["w"], y, logit_bias=-2.0, **kwargs)[0]

  def per_device(params, x, y):
    grads = jax.grad(loss)(params, x, y, "data")
    return jax.lax.pmean(grads, "data")

  grads8 = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                                 in_specs=(P(), P("data"), P("data")),
                                 out_specs=P(), check_vma=check_vma))(
                                     params, x, y)
  grads1 = jax.jit(jax.grad(loss), static_argnums=3)(params, x, y, None)
  _close(grads8, grads1)


def test_pairwise_with_anchor_and_all_pairs():
  keys = jax.random.split(jax.random.key(6), 3)
  emb = {m: _unit(k, (6, 4)) for m, k in zip(["text", "image", "audio"], keys)}
  scale = jnp.float32(3.0)

  loss, metrics = jax.jit(lambda e: align.pairwise_loss(
      e, anchor="image", logit_scale=scale, label_smoothing=0.1))(emb)
  clip = jax.jit(lambda x, y: align.clip_loss(x, y, logit_scale=scale,
                                              label_smoothing=0.1))
  pair_losses = [clip(emb[m], emb["image"]) for m in ("audio", "text")]
  _close(loss, (pair_losses[0][0] + pair_losses[1][0]) / 2)
  _close(metrics["text->image/accuracy"], pair_losses[1][1]["x->y/accuracy"])
  _close(metrics["image->text/accuracy"], pair_losses[1][1]["y->x/accuracy"])
  _close(metrics["audio|image/loss"], pair_losses[0][0])
  assert "audio|text/loss" not in metrics

  loss, metrics = jax.jit(lambda e: align.pairwise_loss(
      e, kind="siglip", logit_scale=scale, logit_bias=-1.0))(emb)
  pairs = [("audio", "image"), ("audio", "text"), ("image", "text")]
  siglip_direct = jax.jit(_siglip_direct)
  direct = [siglip_direct(emb[a], emb[b], scale, -1.0) for a, b in pairs]
  _close(loss, sum(direct) / 3)
  for (a, b), value in zip(pairs, direct):
    _close(metrics[f"{a}|{b}/loss"], value)
    assert f"{b}->{a}/accuracy" in metrics


def test_pairwise_eight_devices_match_one(mesh8):
  keys = jax.random.split(jax.random.key(7), 3)
  emb = {m: _unit(k, (16, 4)) for m, k in zip(["a", "b", "c"], keys)}

  def loss(emb, axis_name):
    return align.pairwise_loss(emb, anchor="a", kind="siglip",
                               logit_scale=4.0, logit_bias=-2.0,
                               axis_name=axis_name)

  sharded = jax.shard_map(lambda e: loss(e, "data"), mesh=mesh8,
                          in_specs=P("data"), out_specs=P())
  (loss8, metrics8), grads8 = jax.jit(jax.value_and_grad(
      sharded, has_aux=True))(emb)
  (loss1, metrics1), grads1 = jax.jit(jax.value_and_grad(
      lambda e: loss(e, None), has_aux=True))(emb)
  _close(loss8, loss1)
  _close(metrics8, metrics1)
  _close(grads8, grads1)


def test_init_constants():
  assert align.siglip_init() == (math.log(10.0), -10.0)
  assert math.exp(align.SIGLIP_INIT_LOGIT_SCALE) == pytest.approx(10.0)
  assert math.exp(align.CLIP_INIT_LOGIT_SCALE) == pytest.approx(1 / 0.07)
  assert align.MAX_LOGIT_SCALE == 100.0


_X = jnp.ones((4, 3)) / math.sqrt(3.0)


@pytest.mark.parametrize("call, match", [
    (lambda: align.clip_loss(_X, jnp.ones((4, 5)), logit_scale=1.0),
     "same shape"),
    (lambda: align.clip_loss(_X, jnp.ones((5, 3)), logit_scale=1.0),
     "same shape"),
    (lambda: align.clip_loss(_X[0], _X[0], logit_scale=1.0), r"x must have"),
    (lambda: align.clip_loss(_X, _X.at[1, 2].set(jnp.nan), logit_scale=1.0),
     "y contains NaN"),
    (lambda: align.clip_loss(_X, _X, logit_scale=jnp.ones(2)),
     "logit_scale must be a scalar"),
    (lambda: align.clip_loss(_X, _X, logit_scale=1.0, label_smoothing=1.0),
     "label_smoothing"),
    (lambda: align.siglip_loss(_X.at[0, 0].set(jnp.inf), _X, logit_scale=1.0,
                               logit_bias=0.0), "x contains NaN or Inf"),
    (lambda: align.siglip_loss(_X, _X, logit_scale=1.0,
                               logit_bias=jnp.zeros(3)),
     "logit_bias must be a scalar"),
    (lambda: align.pairwise_loss({"a": _X, "b": _X}, anchor="c",
                                 logit_scale=1.0), "anchor 'c'"),
    (lambda: align.pairwise_loss({"a": _X}, logit_scale=1.0),
     "at least two modalities"),
    (lambda: align.pairwise_loss({"a": _X, "b": jnp.ones((4, 2))},
                                 logit_scale=1.0), "same shape"),
    (lambda: align.pairwise_loss({"a": _X, "b": _X}, kind="siglip",
                                 logit_scale=1.0), "needs logit_bias"),
    (lambda: align.pairwise_loss({"a": _X, "b": _X}, kind="clip",
                                 logit_scale=1.0, logit_bias=0.0),
     "logit_bias is only used"),
    (lambda: align.pairwise_loss({"a": _X, "b": _X}, kind="siglip",
                                 logit_scale=1.0, logit_bias=0.0,
                                 label_smoothing=0.1),
     "label_smoothing is only used"),
    (lambda: align.pairwise_loss({"a": _X, "b": _X}, kind="infonce",
                                 logit_scale=1.0), "kind must be"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
