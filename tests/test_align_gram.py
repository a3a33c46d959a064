"""gram_volume and gram_loss: explicit Gram determinants, masks, rings."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import align


def _unit(key, shape):
  v = jax.random.normal(key, shape)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _close(a, b, atol=1e-5, rtol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol,
                               rtol=rtol)


def _volume_direct(vectors):
  """sqrt(det G) of the explicit Gram matrix, in float64."""
  stacked = np.stack([np.asarray(v, np.float64) for v in vectors])
  return np.sqrt(max(np.linalg.det(stacked @ stacked.T), 0.0))


@pytest.mark.parametrize("num_others", [1, 2, 3, 4, 5])
def test_gram_volume_matches_determinant(num_others):
  keys = jax.random.split(jax.random.key(num_others), num_others + 1)
  anchor = _unit(keys[0], (5, 8))
  others = [_unit(k, (4, 8)) for k in keys[1:]]
  volumes = jax.jit(align.gram_volume)(anchor, others)
  assert volumes.shape == (5, 4)
  direct = np.array([[_volume_direct([anchor[i]] + [o[j] for o in others])
                      for j in range(4)] for i in range(5)])
  _close(volumes, direct, atol=1e-5, rtol=0)


def test_masked_volume_equals_volume_of_present_subset():
  keys = jax.random.split(jax.random.key(10), 4)
  anchor = _unit(keys[0], (3, 6))
  others = [_unit(k, (7, 6)) for k in keys[1:]]
  # Every non-empty subset of the 3 others, one per tuple.
  mask = np.array([m for m in itertools.product([False, True], repeat=3)
                   if any(m)])
  volumes = jax.jit(align.gram_volume)(anchor, others, mask=mask)
  direct = np.array([
      [_volume_direct([anchor[i]] +
                      [o[j] for o, p in zip(others, present) if p])
       for j, present in enumerate(mask)] for i in range(3)])
  _close(volumes, direct, atol=1e-5, rtol=0)


def test_degenerate_tuples_have_zero_volume_and_finite_gradients():
  v, w, u = jnp.split(_unit(jax.random.key(11), (3, 5)), 3)
  # Tuple 0: all vectors equal the anchor. Tuple 1: two equal others.
  # Tuple 2: a zero vector. Tuple 3: independent (nonzero volume).
  others = [jnp.concatenate([v, w, jnp.zeros_like(v), w]),
            jnp.concatenate([v, w, w, u])]

  def total(anchor, others):
    volumes = align.gram_volume(anchor, others)
    return jnp.sum(volumes), volumes

  grads, volumes = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))(
      v, others)
  _close(volumes[0, :3], [0.0, 0.0, 0.0], atol=1e-6)
  assert volumes[0, 3] > 0.1
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _gram_loss_direct(emb, anchor, scale, eps, masks, negatives_gradient=True):
  """Explicit Gram determinants and log-softmax over the valid samples.

  negatives_gradient=False: the rows' cross-entropy sees the tuples, the
  columns' the anchors, through stop_gradient (GRAM's gather without gradient).
  """
  names = sorted(n for n in emb if n != anchor)
  batch = emb[anchor].shape[0]
  present = {n: np.ones(batch, bool) if masks is None or n not in masks
             else np.asarray(masks[n]) for n in emb}
  valid = [j for j in range(batch)
           if present[anchor][j] and any(present[n][j] for n in names)]

  def logits_of(anchor_emb, other_emb):
    anchors = anchor_emb[np.array(valid)]

    def column(j):
      """Volumes of every valid anchor with tuple j: det of [N, k+1, k+1]."""
      tuple_j = jnp.stack([other_emb[n][j] for n in names if present[n][j]])
      vectors = jnp.concatenate(
          [anchors[:, None], jnp.broadcast_to(tuple_j, (len(valid),) +
                                              tuple_j.shape)], axis=1)
      gram = jnp.einsum("nkd,nld->nkl", vectors, vectors)
      return jnp.sqrt(jnp.linalg.det(gram))

    return -scale * jnp.stack([column(j) for j in valid], axis=1)

  others = {n: emb[n] for n in names}
  if negatives_gradient:
    row_logits = column_logits = logits_of(emb[anchor], others)
  else:
    sg = jax.lax.stop_gradient
    row_logits = logits_of(emb[anchor], sg(others))
    column_logits = logits_of(sg(emb[anchor]), others)
  n = len(valid)
  target = (1.0 - eps) * jnp.eye(n) + eps / n
  rows = -jnp.sum(target * jax.nn.log_softmax(row_logits, axis=1)) / n
  columns = -jnp.sum(target * jax.nn.log_softmax(column_logits, axis=0)) / n
  return (rows + columns) / 2


def _embeddings(seed, batch, width=6, names=("audio", "image", "text")):
  keys = jax.random.split(jax.random.key(seed), len(names) + 1)
  shared = jax.random.normal(keys[-1], (batch, width))
  emb = {n: jax.random.normal(k, (batch, width)) + 1.5 * shared
         for n, k in zip(names, keys)}
  return {n: v / jnp.linalg.norm(v, axis=1, keepdims=True)
          for n, v in emb.items()}


_MASKS = {
    # Sample 1 lacks its anchor, sample 3 has only the anchor: both are left
    # out; samples 2 and 4 keep one of the two others.
    "text": np.array([1, 0, 1, 1, 1, 1, 1], bool),
    "image": np.array([1, 1, 0, 0, 1, 1, 1], bool),
    "audio": np.array([1, 1, 1, 0, 0, 1, 1], bool),
}


@pytest.mark.parametrize("masks", [None, _MASKS], ids=["full", "masked"])
def test_gram_loss_matches_direct_formula(masks):
  emb = _embeddings(20, 7)
  scale = jnp.float32(4.0)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda e, s: align.gram_loss(e, anchor="text", logit_scale=s,
                                   label_smoothing=0.1, masks=masks),
      argnums=(0, 1), has_aux=True))(emb, scale)
  direct, direct_grads = jax.jit(jax.value_and_grad(
      lambda e, s: _gram_loss_direct(e, "text", s, 0.1, masks),
      argnums=(0, 1)))(emb, scale)
  _close(loss, direct, atol=1e-5, rtol=1e-5)
  _close(grads, direct_grads, atol=1e-4, rtol=1e-4)
  _close(metrics["valid_fraction"], 1.0 if masks is None else 5 / 7)
  if masks is not None:
    # Left-out samples get no gradient at all.
    for n in emb:
      _close(grads[0][n][1], np.zeros(6), atol=0)
      _close(grads[0][n][3], np.zeros(6), atol=0)


@pytest.mark.parametrize("masks", [None, _MASKS], ids=["full", "masked"])
def test_gram_reference_gradient_matches_direct_formula(masks):
  """negatives_gradient=False: rows reach the anchors, columns the tuples."""
  emb = _embeddings(27, 7)
  scale = jnp.float32(4.0)

  def value_and_grad(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  results = {}
  for exact in (True, False):
    (loss, metrics), grads = value_and_grad(
        lambda e, s, exact=exact: align.gram_loss(
            e, anchor="text", logit_scale=s, label_smoothing=0.1, masks=masks,
            negatives_gradient=exact))(emb, scale)
    direct, direct_grads = jax.jit(jax.value_and_grad(
        lambda e, s, exact=exact: _gram_loss_direct(e, "text", s, 0.1, masks,
                                                    negatives_gradient=exact),
        argnums=(0, 1)))(emb, scale)
    _close(loss, direct, atol=1e-5, rtol=1e-5)
    _close(grads, direct_grads, atol=1e-4, rtol=1e-4)
    results[exact] = loss, metrics, grads
  # Same value and metrics, another gradient (only the scale's is the same:
  # it gets both terms either way).
  _close(results[True][:2], results[False][:2])
  _close(results[True][2][1], results[False][2][1], atol=1e-5)
  for name in emb:
    difference = np.max(np.abs(np.asarray(results[True][2][0][name]) -
                               np.asarray(results[False][2][0][name])))
    assert difference > 1e-3, name


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "reference"])
def test_gram_gradient_options_on_eight_devices_match_direct_formula(exact, mesh8):
  emb = _embeddings(28, 16)
  masks = {"text": jnp.arange(16) % 7 != 3, "audio": jnp.arange(16) % 3 != 0}
  scale = jnp.float32(3.0)

  def sharded(loss):
    return jax.jit(jax.value_and_grad(jax.shard_map(
        lambda e, s, m: loss(e, anchor="text", logit_scale=s, masks=m,
                             axis_name="data", negatives_gradient=exact)[0],
        mesh=mesh8, in_specs=(P("data"), P(), P("data")), out_specs=P()),
        argnums=(0, 1)))

  direct, direct_grads = jax.jit(jax.value_and_grad(
      lambda e, s: _gram_loss_direct(
          e, "text", s, 0.1, {k: np.asarray(v) for k, v in masks.items()},
          negatives_gradient=exact), argnums=(0, 1)))(emb, scale)
  for loss in (align.gram_loss, align.gram_loss_all_gather):
    value, grads = sharded(loss)(emb, scale, masks)
    _close(value, direct)
    _close(grads, direct_grads, atol=1e-4, rtol=1e-4)


def test_gram_accuracy_and_positive_volume_metrics():
  emb = _embeddings(21, 6)
  _, metrics = jax.jit(lambda e: align.gram_loss(e, anchor="text",
                                                 logit_scale=2.0))(emb)
  direct = np.array([[_volume_direct([emb["text"][i], emb["audio"][j],
                                      emb["image"][j]]) for j in range(6)]
                     for i in range(6)])
  off = ~np.eye(6, dtype=bool)
  rows = np.mean([np.all(direct[i, i] < direct[i][off[i]]) for i in range(6)])
  cols = np.mean([np.all(direct[j, j] < direct[:, j][off[:, j]])
                  for j in range(6)])
  assert 0 < rows < 1
  _close([metrics["anchor->tuple/accuracy"], metrics["tuple->anchor/accuracy"],
          metrics["mean_positive_volume"]],
         [rows, cols, np.mean(np.diag(direct))])


def test_gram_rings_on_eight_devices_match_one(mesh8):
  """Ring and all-gather on 8 devices vs 1: values, metrics, gradients."""
  emb = _embeddings(22, 16, names=("audio", "image", "text", "video"))
  masks = {"text": jnp.arange(16) % 7 != 3, "image": jnp.arange(16) % 3 != 0,
           "video": jnp.arange(16) % 4 != 1}
  scale = jnp.float32(5.0)

  def loss_fn(loss, axis_name):
    return lambda e, s, m: loss(e, anchor="text", logit_scale=s,
                                label_smoothing=0.1, masks=m,
                                axis_name=axis_name)

  def sharded(loss):
    return jax.shard_map(loss_fn(loss, "data"), mesh=mesh8,
                         in_specs=(P("data"), P(), P("data")), out_specs=P())

  def value_and_grad(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  ring = value_and_grad(sharded(align.gram_loss))
  gather = value_and_grad(sharded(align.gram_loss_all_gather))
  single = value_and_grad(loss_fn(align.gram_loss, None))
  (loss1, metrics1), grads1 = single(emb, scale, masks)
  for fn in (ring, gather):
    (loss8, metrics8), grads8 = fn(emb, scale, masks)
    _close(loss8, loss1)
    _close(metrics8, metrics1)
    _close(grads8, grads1)
  assert 0 < metrics1["accuracy"] < 1

  # A degenerate sample (all modalities equal, volume 0) keeps the ring's
  # values and gradients finite.
  degenerate = {n: v.at[5].set(emb["text"][5]) for n, v in emb.items()}
  (loss8, _), grads8 = ring(degenerate, scale, masks)
  assert np.isfinite(loss8)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads8))


@pytest.mark.parametrize("check_vma", [True, False])
def test_trainer_pmean_of_param_grads_is_global_grad(check_vma, mesh8):
  """grad in shard_map w.r.t. replicated params, then pmean = global grad."""
  emb = _embeddings(24, 16)
  params = {"w": jnp.eye(6) + 0.1 * jax.random.normal(jax.random.key(25),
                                                      (6, 6)),
            "t": jnp.float32(1.5)}

  def loss(params, emb, axis_name):
    emb = {**emb, "image": emb["image"] @ params["w"]}
    return align.gram_loss(emb, anchor="text", logit_scale=jnp.exp(params["t"]),
                           axis_name=axis_name)[0]

  def per_device(params, emb):
    return jax.lax.pmean(jax.grad(loss)(params, emb, "data"), "data")

  grads8 = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                                 in_specs=(P(), P("data")), out_specs=P(),
                                 check_vma=check_vma))(params, emb)
  grads1 = jax.jit(jax.grad(loss), static_argnums=2)(params, emb, None)
  _close(grads8, grads1)


def test_gram_ring_on_one_device_mesh(mesh1):
  emb = _embeddings(26, 5)
  sharded = jax.shard_map(
      lambda e: align.gram_loss(e, anchor="text", logit_scale=3.0,
                                axis_name="data")[0],
      mesh=mesh1, in_specs=P("data"), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(sharded))(emb)
  direct, direct_grads = jax.jit(jax.value_and_grad(
      lambda e: _gram_loss_direct(e, "text", 3.0, 0.1, None)))(emb)
  _close(loss, direct)
  _close(grads, direct_grads, atol=1e-4, rtol=1e-4)


def test_gram_loss_degenerate_gradients_finite():
  emb = _embeddings(23, 5)
  emb = {n: v.at[2].set(emb["text"][2]) for n, v in emb.items()}
  emb["image"] = emb["image"].at[4].set(emb["audio"][4])
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda e: align.gram_loss(e, anchor="text", logit_scale=10.0),
      has_aux=True))(emb)
  assert np.isfinite(loss) and np.isfinite(metrics["mean_positive_volume"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


_A = jnp.ones((4, 3)) / jnp.sqrt(3.0)
_EMB = {"text": _A, "image": _A[::-1], "audio": -_A}


def _gram(embeddings=None, **kwargs):
  kwargs = {"anchor": "text", "logit_scale": 1.0, **kwargs}
  return align.gram_loss(_EMB if embeddings is None else embeddings, **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: align.gram_volume(_A, []), "K >= 1"),
    (lambda: align.gram_volume(_A, _A), "sequence"),
    (lambda: align.gram_volume(_A, [jnp.ones((4, 2))]), "width 2"),
    (lambda: align.gram_volume(_A, [_A, jnp.ones((5, 3))]), "same shape"),
    (lambda: align.gram_volume(_A, [_A, _A], mask=np.ones((4, 3), bool)),
     r"mask must be a bool array of shape \[B2, K\] = \(4, 2\)"),
    (lambda: align.gram_volume(_A, [_A, _A], mask=np.ones((4, 2))),
     "mask must be a bool"),
    (lambda: align.gram_volume(_A, [_A, _A], mask=np.array(
        [[1, 0], [0, 0], [1, 1], [0, 1]], bool)), r"sample\(s\) \[1\]"),
    (lambda: align.gram_volume(_A.at[0, 0].set(jnp.nan), [_A]),
     "anchor contains NaN"),
    (lambda: align.gram_volume(_A, [_A, _A.at[2, 1].set(jnp.inf)]),
     r"others\[1\] contains NaN or Inf"),
    (lambda: _gram(anchor="depth"), "anchor 'depth'"),
    (lambda: _gram({"text": _A}), "K >= 1"),
    (lambda: _gram({"text": _A, "image": jnp.ones((5, 3))}), "same shape"),
    (lambda: _gram({"text": _A, "image": jnp.ones((4, 2))}), "same shape"),
    (lambda: _gram(masks={"image": np.ones((4, 1), bool)}),
     r"masks\['image'\] must be a bool array of shape \[B\]"),
    (lambda: _gram(masks={"image": np.ones(4)}), r"masks\['image'\]"),
    (lambda: _gram(masks={"depth": np.ones(4, bool)}), "'depth'"),
    (lambda: _gram(masks={"text": np.array([1, 1, 0, 1], bool),
                          "image": np.array([1, 0, 0, 1], bool),
                          "audio": np.array([1, 1, 0, 0], bool)}),
     r"no modality present for sample\(s\) \[2\]"),
    (lambda: _gram({**_EMB, "audio": _A.at[3, 0].set(jnp.nan)}),
     r"embeddings\['audio'\] contains NaN"),
    (lambda: _gram(logit_scale=jnp.ones(3)), "logit_scale must be a scalar"),
    (lambda: _gram(label_smoothing=-0.1), "label_smoothing"),
    (lambda: _gram(negatives_gradient="no"),
     "negatives_gradient must be a Python bool"),
    (lambda: _gram(negatives_gradient=jnp.array(False)),
     "negatives_gradient must be a Python bool"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
