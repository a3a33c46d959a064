"""Evaluation metrics against direct (slow, obviously correct) computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.evals import calibration
from mmjax.evals import classification
from mmjax.evals import geometry
from mmjax.evals import retrieval

# One shape for most retrieval tests, so the rank program compiles rarely.
N, D = 70, 12
BLOCK = 16


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_ranks(scores):
  """Pessimistic 1-based ranks of the diagonal of a full [N, N] score matrix."""
  n = scores.shape[0]
  return np.array([np.sum(scores[i] >= scores[i, i]) for i in range(n)])


@pytest.fixture(scope="module")
def pair():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(N, D)).astype(np.float32)
  t = (q + 0.9 * rng.normal(size=(N, D))).astype(np.float32)
  return q, t


# --------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------


def test_retrieval_ranks_and_metrics_match_brute_force(pair):
  q, t = pair
  ranks = retrieval.retrieval_ranks(q, t, block_size=BLOCK)
  expected = _brute_ranks(_unit(q.astype(np.float64)) @
                          _unit(t.astype(np.float64)).T)
  np.testing.assert_array_equal(ranks, expected)
  assert 0 < np.mean(expected == 1) < 1  # The case is neither trivial nor void.
  metrics = retrieval.retrieval_metrics(q, t, ks=(1, 5, 10), block_size=BLOCK)
  assert set(metrics) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
  for k in (1, 5, 10):
    assert metrics[f"R@{k}"] == pytest.approx(np.mean(expected <= k))
  assert metrics["median_rank"] == pytest.approx(np.median(expected))
  assert metrics["mean_rank"] == pytest.approx(np.mean(expected))


def test_retrieval_raw_dot_product_when_not_normalized(pair):
  q, t = pair
  scale = np.linspace(0.5, 3.0, N)[:, None].astype(np.float32)
  ranks = retrieval.retrieval_ranks(q, t * scale, normalize=False,
                                    block_size=BLOCK)
  expected = _brute_ranks(q.astype(np.float64) @ (t * scale).T.astype(
      np.float64))
  np.testing.assert_array_equal(ranks, expected)


def test_retrieval_identical_on_8_devices_and_1(pair, mesh8, mesh1):
  q, t = pair
  plain = retrieval.retrieval_ranks(q, t, block_size=BLOCK)
  on8 = retrieval.retrieval_ranks(q, t, block_size=BLOCK, mesh=mesh8)
  on1 = retrieval.retrieval_ranks(q, t, block_size=BLOCK, mesh=mesh1)
  np.testing.assert_array_equal(on8, plain)
  np.testing.assert_array_equal(on1, plain)
  assert (retrieval.retrieval_metrics(q, t, block_size=BLOCK, mesh=mesh8) ==
          retrieval.retrieval_metrics(q, t, block_size=BLOCK))


def test_retrieval_perfectly_aligned_set_has_recall_one(pair):
  q, _ = pair
  metrics = retrieval.retrieval_metrics(q, 3.0 * q, block_size=BLOCK)
  assert metrics == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0,
                     "mean_rank": 1.0}


def test_retrieval_shuffled_set_recall_is_fixed_point_fraction(pair):
  q, _ = pair
  perm = np.random.default_rng(1).permutation(N)
  # Query i's best target is the copy of itself, at j = perm^-1(i); it is the
  # match only where perm has a fixed point.
  metrics = retrieval.retrieval_metrics(q, q[perm], block_size=BLOCK)
  assert metrics["R@1"] == pytest.approx(np.mean(perm == np.arange(N)))
  assert metrics["R@1"] < 0.1


def test_retrieval_ties_are_pessimistic():
  # Queries 0 and 1 tie between targets 0 and 1; query 2 ties with all three.
  t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  q = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]], np.float32)
  np.testing.assert_array_equal(retrieval.retrieval_ranks(q, t), [2, 2, 3])
  constant = np.ones((5, 3), np.float32)
  np.testing.assert_array_equal(
      retrieval.retrieval_ranks(constant, constant), [5] * 5)


def test_recall_curve_and_metrics_from_ranks():
  ranks = np.array([1, 3, 2, 7, 1, 10])
  curve = retrieval.recall_at_k_curve(ranks, 8)
  np.testing.assert_allclose(curve, [np.mean(ranks <= k) for k in range(1, 9)])
  metrics = retrieval.metrics_from_ranks(ranks, ks=(1, 2))
  assert metrics == {"R@1": 2 / 6, "R@2": 3 / 6, "median_rank": 2.5,
                     "mean_rank": 4.0}


def _neg_sq_distance_sum(query_block, tuples):
  return -sum(jnp.sum((query_block[:, None, :] - t[None]) ** 2, -1)
              for t in tuples)


def _neg_gram_volume(query_block, tuples):
  vectors = jnp.stack(
      [jnp.broadcast_to(query_block[:, None], (query_block.shape[0],) +
                        tuples[0].shape)] +
      [jnp.broadcast_to(t[None], (query_block.shape[0],) + t.shape)
       for t in tuples], axis=-2)  # [b, N, K+1, D]
  gram = jnp.einsum("bnkd,bnld->bnkl", vectors, vectors)
  return -jnp.sqrt(jnp.maximum(jnp.linalg.det(gram), 0.0))


def test_joint_retrieval_sum_cosine_and_callable(pair, mesh8):
  q, t = pair
  rng = np.random.default_rng(2)
  u = (q + 1.2 * rng.normal(size=q.shape)).astype(np.float32)
  qu, tu, uu = (_unit(a.astype(np.float64)) for a in (q, t, u))
  expected = _brute_ranks(qu @ tu.T + qu @ uu.T)
  ranks = retrieval.joint_retrieval_ranks(q, [t, u], block_size=BLOCK)
  np.testing.assert_array_equal(ranks, expected)
  np.testing.assert_array_equal(
      retrieval.joint_retrieval_ranks(q, [t, u], block_size=BLOCK,
                                      mesh=mesh8), expected)
  sq = -(((qu[:, None] - tu[None]) ** 2).sum(-1) +
         ((qu[:, None] - uu[None]) ** 2).sum(-1))
  custom = retrieval.joint_retrieval_ranks(
      q, [t, u], score=_neg_sq_distance_sum, block_size=BLOCK)
  np.testing.assert_array_equal(custom, _brute_ranks(sq))
  # A volume score as GRAM defines it: sqrt(det) of the Gram matrix of
  # (q_i, t_j, u_j); a smaller volume is a better match, so the score is -vol.
  volume = retrieval.joint_retrieval_ranks(
      q, [t, u], score=_neg_gram_volume, block_size=BLOCK)
  gram = np.empty((N, N))
  for i in range(N):
    for j in range(N):
      vectors = np.stack([qu[i], tu[j], uu[j]])
      gram[i, j] = -np.sqrt(max(np.linalg.det(vectors @ vectors.T), 0.0))
  np.testing.assert_array_equal(volume, _brute_ranks(gram))
  metrics = retrieval.joint_retrieval_metrics(q, [t, u], ks=(1, 5),
                                              block_size=BLOCK)
  assert metrics["R@1"] == pytest.approx(np.mean(expected == 1))
  assert metrics["R@5"] == pytest.approx(np.mean(expected <= 5))


def test_retrieval_bad_input():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  with pytest.raises(ValueError, match="targets.*N=5"):
    retrieval.retrieval_metrics(x, x[:5], ks=(1,))
  with pytest.raises(ValueError, match="targets.*D=3"):
    retrieval.retrieval_metrics(x, x[:, :3], ks=(1,))
  with pytest.raises(ValueError, match="queries.*rank 2"):
    retrieval.retrieval_metrics(x[None], x, ks=(1,))
  with pytest.raises(ValueError, match="k=10.*N=6"):
    retrieval.retrieval_metrics(x, x, ks=(1, 10))
  with pytest.raises(ValueError, match="ks"):
    retrieval.retrieval_metrics(x, x, ks=(0,))
  bad = x.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="targets.*NaN"):
    retrieval.retrieval_metrics(x, bad, ks=(1,))
  with pytest.raises(ValueError, match="all zeros"):
    retrieval.retrieval_metrics(np.zeros_like(x), x, ks=(1,))
  with pytest.raises(ValueError, match="block_size"):
    retrieval.retrieval_metrics(x, x, ks=(1,), block_size=0)
  with pytest.raises(ValueError, match=r"target_tuples\[1\].*N=5"):
    retrieval.joint_retrieval_metrics(x, [x, x[:5]], ks=(1,))
  with pytest.raises(ValueError, match="target_tuples.*list"):
    retrieval.joint_retrieval_metrics(x, x, ks=(1,))
  with pytest.raises(ValueError, match="at least one"):
    retrieval.joint_retrieval_metrics(x, [], ks=(1,))
  with pytest.raises(ValueError, match="unknown `score`"):
    retrieval.joint_retrieval_metrics(x, [x], ks=(1,), score="volume")
  with pytest.raises(ValueError, match="expected"):
    retrieval.joint_retrieval_metrics(x, [x], ks=(1,),
                                      score=lambda qb, tt: qb[:, 0])
  with pytest.raises(ValueError, match="NaN scores for query 0"):
    retrieval.joint_retrieval_metrics(
        x, [x], ks=(1,), score=lambda qb, tt: jnp.sqrt(-(qb @ tt[0].T) ** 2))
  with pytest.raises(ValueError, match="max_k"):
    retrieval.recall_at_k_curve(np.array([1, 2]), 0)
  with pytest.raises(ValueError, match="1-based"):
    retrieval.recall_at_k_curve(np.array([0, 2]), 3)
  other_axis = jax.make_mesh((1,), ("model",),
                             axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="mesh.*'data'"):
    retrieval.retrieval_metrics(x, x, ks=(1,), mesh=other_axis)


# --------------------------------------------------------------------------
# Zero-shot classification.
# --------------------------------------------------------------------------


def _fake_text_encoder(prompts):
  """Deterministic per-string embeddings [T, 6] built from character codes."""
  out = np.zeros((len(prompts), 6))
  for i, p in enumerate(prompts):
    codes = np.frombuffer(p.encode(), np.uint8).astype(np.float64)
    out[i] = [np.sin(codes * (j + 1)).sum() for j in range(6)]
  return out


def test_zero_shot_classifier_direct_and_from_encoder():
  rng = np.random.default_rng(4)
  per_prompt = rng.normal(size=(3, 5, 7))
  got = classification.zero_shot_classifier(per_prompt)
  expected = _unit(_unit(per_prompt).mean(axis=1))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  names = ["circle", "square", "triangle"]
  templates = ["a {} drawn in red.", "one {}.", "{} shape"]
  from_encoder = classification.zero_shot_classifier(
      _fake_text_encoder, names, templates)
  stacked = np.stack([_fake_text_encoder([t.format(n) for t in templates])
                      for n in names])
  np.testing.assert_allclose(
      from_encoder, classification.zero_shot_classifier(stacked), rtol=1e-6)
  for template in classification.DEFAULT_PROMPT_TEMPLATES:
    assert template.count("{}") == 1


def test_zero_shot_metrics_against_direct_argmax():
  rng = np.random.default_rng(5)
  classes = _unit(rng.normal(size=(4, 8)))
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 1])
  # Hand-made: each embedding is its class embedding -> accuracy 1.
  exact = classification.zero_shot_metrics(3 * classes[labels], classes, labels)
  assert exact["accuracy"] == 1.0
  np.testing.assert_array_equal(exact["per_class_accuracy"], [1, 1, 1, 1])
  x = classes[labels] + 0.8 * rng.normal(size=(10, 8))
  got = classification.zero_shot_metrics(x, classes, labels)
  predictions = np.argmax(_unit(x) @ classes.T, axis=1)
  assert got["accuracy"] == pytest.approx(np.mean(predictions == labels))
  for c in range(4):
    assert got["per_class_accuracy"][c] == pytest.approx(
        np.mean(predictions[labels == c] == c))
  # A class with no sample is NaN, left out of the class mean.
  five = np.concatenate([classes, _unit(rng.normal(size=(1, 8)))])
  got5 = classification.zero_shot_metrics(x, five, labels)
  assert np.isnan(got5["per_class_accuracy"][4])
  assert got5["mean_per_class_accuracy"] == pytest.approx(
      np.nanmean(got5["per_class_accuracy"]))


def test_zero_shot_bad_input():
  classes = np.eye(3, 4)
  x = np.ones((5, 4))
  with pytest.raises(ValueError, match="labels.*out of range"):
    classification.zero_shot_metrics(x, classes, np.array([0, 1, 2, 3, 0]))
  with pytest.raises(ValueError, match="labels.*negative"):
    classification.zero_shot_metrics(x, classes, np.array([0, 1, -1, 0, 0]))
  with pytest.raises(ValueError, match="labels.*5"):
    classification.zero_shot_metrics(x, classes, np.array([0, 1]))
  with pytest.raises(ValueError, match="labels.*integer"):
    classification.zero_shot_metrics(x, classes, np.zeros(5))
  with pytest.raises(ValueError, match="class_embeddings.*D=4.*D=3"):
    classification.zero_shot_metrics(x[:, :3], classes, np.zeros(5, int))
  with pytest.raises(ValueError, match=r"rank 3 \[C, T, D\]"):
    classification.zero_shot_classifier(np.ones((3, 4)))
  with pytest.raises(ValueError, match="class_names"):
    classification.zero_shot_classifier(_fake_text_encoder)
  with pytest.raises(ValueError, match="exactly one"):
    classification.zero_shot_classifier(_fake_text_encoder, ["a"], ["no slot"])
  with pytest.raises(ValueError, match="text encoder returned shape"):
    classification.zero_shot_classifier(lambda p: np.ones((1, 3)), ["a"],
                                        ["x {}", "y {}"])


# --------------------------------------------------------------------------
# Linear probe and k-NN.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs():
  rng = np.random.default_rng(6)
  means = 1.2 * rng.normal(size=(4, 10))
  def split(n):
    y = rng.integers(0, 4, n)
    return (means[y] + rng.normal(size=(n, 10))).astype(np.float32), y
  return split(240), split(120), split(120)


def test_linear_probe_reaches_the_regularised_optimum(blobs):
  (xtr, ytr), (xva, yva), (xte, yte) = blobs
  grid = (1e-3, 1e-2, 1e-1)
  out = classification.linear_probe(xtr, ytr, xva, yva, xte, yte,
                                    l2_grid=grid, steps=300)
  # The chosen l2 is the best on val, the larger one on ties.
  best = max(grid, key=lambda l2: (out["val_accuracy_per_l2"][l2], l2))
  assert out["l2"] == best
  w, b = out["params"]["w"].astype(np.float64), out["params"]["b"]
  # Optimality, by the closed-form gradient of mean CE + l2/2 ||W||^2.
  logits = xtr @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  residual = (p - np.eye(4)[ytr]) / len(ytr)
  grad_w = xtr.T @ residual + out["l2"] * w
  grad_b = residual.sum(0)
  assert np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum()) < 1e-3
  assert out["test_accuracy"] == pytest.approx(
      np.mean(np.argmax(xte @ w + b, 1) == yte))
  assert out["val_accuracy"] == out["val_accuracy_per_l2"][best]
  assert out["test_accuracy"] > 0.8  # 4 separated blobs; chance is 0.25.


def test_linear_probe_bad_input(blobs):
  (xtr, ytr), (xva, yva), (xte, yte) = blobs
  with pytest.raises(ValueError, match="val_x.*D=9"):
    classification.linear_probe(xtr, ytr, xva[:, :9], yva, xte, yte)
  with pytest.raises(ValueError, match="test_y"):
    classification.linear_probe(xtr, ytr, xva, yva, xte, yte[:-1])
  with pytest.raises(ValueError, match="out of range.*num_classes=3"):
    classification.linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=3)
  with pytest.raises(ValueError, match="l2_grid"):
    classification.linear_probe(xtr, ytr, xva, yva, xte, yte, l2_grid=(-1.0,))


def _direct_knn(xtr, ytr, xte, k, temperature, num_classes):
  xtr, xte = _unit(xtr.astype(np.float64)), _unit(xte.astype(np.float64))
  predictions = []
  for x in xte:
    sims = xtr @ x
    order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
    votes = np.zeros(num_classes)
    for j in order:
      votes[ytr[j]] += 1.0 if temperature is None else np.exp(
          sims[j] / temperature)
    predictions.append(int(np.argmax(votes)))
  return np.array(predictions)


@pytest.mark.parametrize("k,temperature", [(5, 0.1), (8, None)])
def test_knn_against_direct_vote(blobs, k, temperature):
  (xtr, ytr), _, (xte, yte) = blobs
  got = classification.knn_classify(xtr, ytr, xte, yte, k=k,
                                    temperature=temperature, block_size=50)
  expected = _direct_knn(xtr, ytr, xte, k, temperature, 4)
  np.testing.assert_array_equal(got["predictions"], expected)
  assert got["accuracy"] == pytest.approx(np.mean(expected == yte))


def test_knn_on_its_own_train_set_with_k1_is_exact(blobs):
  (xtr, ytr), _, _ = blobs
  assert classification.knn_classify(xtr, ytr, xtr, ytr, k=1)["accuracy"] == 1


def test_knn_bad_input(blobs):
  (xtr, ytr), _, (xte, yte) = blobs
  with pytest.raises(ValueError, match="k.*N_train=240"):
    classification.knn_classify(xtr, ytr, xte, yte, k=241)
  with pytest.raises(ValueError, match="temperature"):
    classification.knn_classify(xtr, ytr, xte, yte, temperature=0.0)
  with pytest.raises(ValueError, match="test_x.*D=3"):
    classification.knn_classify(xtr, ytr, xte[:, :3], yte)
  with pytest.raises(ValueError, match="train_y.*out of range"):
    classification.knn_classify(xtr, ytr, xte, yte, num_classes=2)


# --------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------


def _direct_ece(probs, labels, n_bins):
  conf, pred = probs.max(1), probs.argmax(1)
  total = 0.0
  for b in range(n_bins):
    lo, hi = b / n_bins, (b + 1) / n_bins
    inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
    if inside.any():
      gap = abs(np.mean(pred[inside] == labels[inside]) - conf[inside].mean())
      total += inside.sum() / len(conf) * gap
  return total


def test_ece_against_direct_bins():
  rng = np.random.default_rng(7)
  logits = 2.0 * rng.normal(size=(300, 5))
  labels = rng.integers(0, 5, 300)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  for n_bins in (1, 7, 15):
    expected = _direct_ece(probs, labels, n_bins)
    assert calibration.expected_calibration_error(
        probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)
    assert calibration.expected_calibration_error(
        logits, labels, n_bins, from_logits=True) == pytest.approx(
            expected, abs=1e-9)


def test_ece_hand_made_cases():
  # Confidence 0.75 and 3 of 4 right: perfectly calibrated.
  probs = np.array([[0.75, 0.25]] * 4)
  assert calibration.expected_calibration_error(
      probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
  one_hot = np.eye(3)[[0, 1, 2, 1]]
  assert calibration.expected_calibration_error(
      one_hot, np.array([0, 1, 2, 1])) == 0.0
  assert calibration.expected_calibration_error(
      one_hot, np.array([1, 2, 0, 0])) == 1.0
  # A confidence on a bin edge belongs to the bin below (right-closed bins).
  edge = np.array([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1]])
  diagram = calibration.reliability_diagram(edge, np.array([0, 0, 0]), 5)
  np.testing.assert_array_equal(diagram["bin_count"], [0, 0, 2, 0, 1])
  assert diagram["bin_accuracy"][2] == 0.5
  assert diagram["bin_confidence"][2] == pytest.approx(0.6)
  assert np.isnan(diagram["bin_accuracy"][0])
  assert diagram["ece"] == pytest.approx((2 * 0.1 + 1 * 0.1) / 3)
  assert diagram["mce"] == pytest.approx(0.1)


def test_calibration_bad_input():
  probs = np.array([[0.5, 0.5], [0.9, 0.1]])
  with pytest.raises(ValueError, match="n_bins"):
    calibration.expected_calibration_error(probs, np.array([0, 1]), n_bins=0)
  with pytest.raises(ValueError, match="labels.*out of range"):
    calibration.expected_calibration_error(probs, np.array([0, 2]))
  with pytest.raises(ValueError, match="row 1.*from_logits"):
    calibration.expected_calibration_error(np.array([[0.5, 0.5], [0.5, 0.2]]),
                                           np.array([0, 1]))
  with pytest.raises(ValueError, match=r"\[0, 1\].*from_logits"):
    calibration.reliability_diagram(np.array([[2.0, -1.0]]), np.array([0]))
  with pytest.raises(ValueError, match="labels.*3 entries.*N=2"):
    calibration.expected_calibration_error(probs, np.array([0, 1, 0]))


# --------------------------------------------------------------------------
# Geometry.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paired():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(40, 6))
  y = x + 0.5 * rng.normal(size=x.shape) + 0.8
  return x, y


def test_modality_gap(paired):
  x, y = paired
  assert geometry.modality_gap(x, x * 2.5) == pytest.approx(0.0, abs=1e-12)
  expected = np.linalg.norm(_unit(x).mean(0) - _unit(y[:25]).mean(0))
  assert geometry.modality_gap(x, y[:25]) == pytest.approx(expected)
  e = np.eye(6)
  assert geometry.modality_gap(np.tile(e[0], (3, 1)),
                               np.tile(e[1], (5, 1))) == pytest.approx(
                                   np.sqrt(2))


def test_alignment_and_uniformity(paired):
  x, y = paired
  assert geometry.alignment(x, x) == pytest.approx(0.0, abs=1e-12)
  for alpha in (1.0, 2.0):
    expected = np.mean(np.linalg.norm(_unit(x) - _unit(y), axis=1) ** alpha)
    assert geometry.alignment(x, y, alpha=alpha) == pytest.approx(expected)
  e = np.eye(3)[:1]
  assert geometry.alignment(e, -e) == pytest.approx(4.0)
  u = _unit(x)
  for t in (2.0, 50.0):
    sq = ((u[:, None] - u[None]) ** 2).sum(-1)
    terms = -t * sq[~np.eye(len(u), dtype=bool)]
    expected = terms.max() + np.log(np.mean(np.exp(terms - terms.max())))
    assert geometry.uniformity(x, t=t) == pytest.approx(expected, rel=1e-9)
  assert geometry.uniformity(np.ones((4, 3))) == pytest.approx(0.0)
  # Two antipodal points: one distance of 2, log exp(-t * 4).
  assert geometry.uniformity(np.array([[1.0, 0], [-1.0, 0]]), t=3) == \
      pytest.approx(-12.0)


def test_uniformity_and_knn_blocked_equal_unblocked(paired, monkeypatch):
  x, y = paired
  whole_u = geometry.uniformity(x)
  whole_knn = geometry.mutual_knn_alignment(x, y, k=4)
  monkeypatch.setattr(geometry, "_BLOCK", 7)
  assert geometry.uniformity(x) == pytest.approx(whole_u, rel=1e-12)
  assert geometry.mutual_knn_alignment(x, y, k=4) == whole_knn


def test_mutual_knn_alignment(paired):
  x, y = paired
  k = 5
  ux, uy = _unit(x), _unit(y)
  def knn(u, i):
    sims = u @ u[i]
    return set(sorted((j for j in range(len(u)) if j != i),
                      key=lambda j: (-sims[j], j))[:k])
  expected = np.mean([len(knn(ux, i) & knn(uy, i)) / k for i in range(len(x))])
  assert geometry.mutual_knn_alignment(x, y, k=k) == pytest.approx(expected)
  rotation = np.linalg.qr(np.random.default_rng(9).normal(size=(6, 6)))[0]
  assert geometry.mutual_knn_alignment(x, x @ rotation, k=k) == 1.0


def test_linear_cka(paired):
  x, y = paired
  assert geometry.linear_cka(x, x) == pytest.approx(1.0)
  rotation = np.linalg.qr(np.random.default_rng(10).normal(size=(6, 6)))[0]
  assert geometry.linear_cka(x, 3.0 * x @ rotation + 2.0) == pytest.approx(1.0)
  z = np.random.default_rng(11).normal(size=(40, 9))  # Different width D.
  h = np.eye(40) - 1 / 40
  for a, b in ((x, y), (x, z)):
    ka, kb = h @ a @ a.T @ h, h @ b @ b.T @ h
    expected = np.trace(ka @ kb) / np.sqrt(np.trace(ka @ ka) *
                                           np.trace(kb @ kb))
    assert geometry.linear_cka(a, b) == pytest.approx(expected)


def test_geometry_bad_input(paired):
  x, y = paired
  with pytest.raises(ValueError, match="y.*N=39"):
    geometry.alignment(x, y[:39])
  with pytest.raises(ValueError, match="y.*D=5"):
    geometry.alignment(x, y[:, :5])
  with pytest.raises(ValueError, match="y.*D=5"):
    geometry.modality_gap(x, y[:, :5])
  with pytest.raises(ValueError, match="x.*rank 2"):
    geometry.uniformity(x[0])
  with pytest.raises(ValueError, match="k.*N - 1 = 39"):
    geometry.mutual_knn_alignment(x, y, k=40)
  with pytest.raises(ValueError, match="y.*N=30"):
    geometry.mutual_knn_alignment(x, y[:30])
  with pytest.raises(ValueError, match="y.*N=30"):
    geometry.linear_cka(x, y[:30])
  with pytest.raises(ValueError, match="every row of `y`"):
    geometry.linear_cka(x, np.ones_like(y))
  with pytest.raises(ValueError, match="alpha"):
    geometry.alignment(x, y, alpha=0)
