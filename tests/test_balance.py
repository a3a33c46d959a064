"""Modality balance (mmjax.balance): each rule against a hand-computed case, the
transformations on a gradient tree (modulated towers scaled as the rule says, every
other gradient untouched), K = 3 end to end through the train step, CGGM's direction
term against a direct formula, and each bad config."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import balance
from mmjax import config_lib
from mmjax import experiment
from mmjax.balance import rules
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


# ------------------------------------------------------------------- the rules


def test_ogm_ge_coefficient_of_a_known_pair_and_of_three():
  k = np.asarray(balance.ogm_ge_coefficients(jnp.array([0.6, 0.3]), 0.8))
  # rho = 0.6 / 0.3 = 2 for the first (k = 1 - tanh(1.6)); the second has rho 1: k = 1.
  np.testing.assert_allclose(k, [1 - math.tanh(1.6), 1.0], rtol=1e-6)
  k3 = np.asarray(balance.ogm_ge_coefficients(jnp.array([0.6, 0.3, 0.45]), 0.8))
  np.testing.assert_allclose(k3, [1 - math.tanh(1.6), 1.0, 1 - math.tanh(1.2)], rtol=1e-6)


def test_mlb_speeds_up_the_weak_and_slows_the_strong():
  k = np.asarray(balance.mlb_coefficients(jnp.array([0.6, 0.3]), 0.8))
  np.testing.assert_allclose(k, [1 + math.tanh(0.8 * (0.5 - 1)), 1 + math.tanh(0.8)],
                             rtol=1e-6)
  k3 = np.asarray(balance.mlb_coefficients(jnp.array([0.2, 0.4, 0.6]), 1.0))
  np.testing.assert_allclose(k3, [1 + math.tanh(0.5 / 0.2 - 1), 1 + math.tanh(0.4 / 0.4 - 1),
                                  1 + math.tanh(0.3 / 0.6 - 1)], rtol=1e-6)
  np.testing.assert_allclose(balance.mlb_coefficients(jnp.array([0.5, 0.5]), 0.8), [1, 1])


def test_cggm_magnitude_of_known_accuracy_changes():
  b = np.asarray(balance.cggm_coefficients(jnp.array([0.5, 0.2]), jnp.array([0.3, 0.1]), 1.3))
  # d = (0.2, 0.1), D = 0.3: B = ((0.3 - 0.2) / 0.3, (0.3 - 0.1) / 0.3) x rho.
  np.testing.assert_allclose(b, [1.3 / 3, 1.3 * 2 / 3], rtol=1e-5)


def test_inforeg_regulates_the_leader_in_its_window_only():
  s = jnp.array([0.6, 0.3])
  np.testing.assert_allclose(
      balance.inforeg_strengths(s, jnp.array([0.1, 0.1]), 0.95, 0.05),
      [0.95 * math.exp(math.tanh(0.3)), 0.0], rtol=1e-6)
  np.testing.assert_allclose(   # out of its window (growth <= threshold): no regulation
      balance.inforeg_strengths(s, jnp.array([0.01, 0.9]), 0.95, 0.05), [0.0, 0.0])


# ------------------------------------------------------ the transformations


def _tree():
  r = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
  return {"towers_audio": {"w": leaf(4, 3), "b": leaf(3)},
          "towers_image": {"w": leaf(5, 2), "b": leaf(2)},
          "fuse": {"w": leaf(3, 3)}, "logit_scale": leaf()}


def _metrics(template, values):
  return {template.format(m): jnp.float32(v) for m, v in values.items()}


def _check_scaled(out, grads, coefficients):
  for m, k in coefficients.items():
    for name in ("w", "b"):
      np.testing.assert_allclose(out[f"towers_{m}"][name], k * grads[f"towers_{m}"][name],
                                 rtol=1e-6)
  for key in ("fuse", "logit_scale"):
    np.testing.assert_array_equal(jax.tree.leaves(out[key]), jax.tree.leaves(grads[key]))


def test_ogm_scales_each_tower_by_its_coefficient_and_nothing_else():
  grads = _tree()
  tx = rules.ogm_ge(("audio", "image"), 0.8, noise=False)
  state = tx.init(grads)
  metrics = _metrics(rules.CONFIDENCE, {"audio": 0.6, "image": 0.3})
  out, state = tx.update(grads, state, grads, metrics=metrics, step=3,
                     rng=jax.random.key(0))
  _check_scaled(out, grads, {"audio": 1 - math.tanh(1.6), "image": 1.0})
  np.testing.assert_allclose(state.coefficients, [1 - math.tanh(1.6), 1.0], rtol=1e-6)
  # Outside the window [start, end): every gradient as it came.
  tx = rules.ogm_ge(("audio", "image"), 0.8, noise=False, start_step=5, end_step=9)
  out, _ = tx.update(grads, tx.init(grads), grads, metrics=metrics, step=3,
                     rng=jax.random.key(0))
  _check_scaled(out, grads, {"audio": 1.0, "image": 1.0})


def test_ogm_ge_noise_has_the_gradients_std_on_matrices_only():
  grads = {"towers_a": {"w": jnp.full((200, 100), 2.0) + jnp.arange(100.0) / 10,
                        "b": jnp.ones((7,))},
           "towers_b": {"w": jnp.zeros((3, 3))}, "head": {"w": jnp.ones((4, 4))}}
  tx = rules.ogm_ge(("a", "b"), 0.8, noise=True)
  metrics = _metrics(rules.CONFIDENCE, {"a": 0.9, "b": 0.3})
  out, state = tx.update(grads, tx.init(grads), grads, metrics=metrics, step=0,
                         rng=jax.random.key(1))
  k = float(state.coefficients[0])
  noise = np.asarray(out["towers_a"]["w"] - k * grads["towers_a"]["w"])
  std = float(jnp.std(grads["towers_a"]["w"]))
  assert abs(noise.mean()) < 0.02 * std
  assert abs(noise.std() / std - 1) < 0.02
  np.testing.assert_allclose(out["towers_a"]["b"], k * grads["towers_a"]["b"], rtol=1e-6)
  np.testing.assert_array_equal(out["head"]["w"], grads["head"]["w"])


def test_mlb_and_cggm_transforms_scale_by_their_rules():
  grads = _tree()
  tx = rules.mlb(("audio", "image"), 0.8)
  out, _ = tx.update(grads, tx.init(grads), grads,
                     metrics=_metrics(rules.CONFIDENCE, {"audio": 0.6, "image": 0.3}),
                     step=0, rng=None)
  _check_scaled(out, grads, {"audio": 1 + math.tanh(-0.4), "image": 1 + math.tanh(0.8)})

  tx = rules.cggm(("audio", "image"), 1.3)
  state = tx.init(grads)
  acc = lambda a, i: _metrics(rules.ACCURACY, {"audio": a, "image": i})
  _, state = tx.update(grads, state, grads, metrics=acc(0.3, 0.1), step=0, rng=None)
  out, state = tx.update(grads, state, grads, metrics=acc(0.5, 0.2), step=1, rng=None)
  _check_scaled(out, grads, {"audio": 1.3 / 3, "image": 1.3 * 2 / 3})
  np.testing.assert_allclose(state.previous, [0.5, 0.2])


def test_inforeg_adds_the_proximal_gradient_after_its_anchor():
  params = _tree()
  grads = jax.tree.map(lambda x: 0.1 * x, _tree())
  tx = rules.inforeg(("audio", "image"), 0.95, threshold=0.05, period=2, window=10)
  state = tx.init(params)
  metrics = _metrics(rules.CONFIDENCE, {"audio": 0.6, "image": 0.3})
  out, state = tx.update(grads, state, params, metrics=metrics, step=0, rng=None)
  _check_scaled(out, grads, {"audio": 1.0, "image": 1.0})   # params == anchor: no pull
  moved = jax.tree.map(lambda p: p + 0.5, params)
  out, state = tx.update(grads, state, moved, metrics=metrics, step=1, rng=None)
  beta = 0.95 * math.exp(math.tanh(0.3))
  np.testing.assert_allclose(out["towers_audio"]["w"], grads["towers_audio"]["w"] + beta * 0.5,
                             rtol=1e-5)
  np.testing.assert_array_equal(out["towers_image"]["w"], grads["towers_image"]["w"])
  np.testing.assert_array_equal(out["fuse"]["w"], grads["fuse"]["w"])
  # At step 2 a period ends: the anchor becomes the params, and the growth is that of
  # the traces (one period recorded: (T/10 - 0) / (T/10) = 1).
  out, state = tx.update(grads, state, moved, metrics=metrics, step=2, rng=None)
  np.testing.assert_allclose(out["towers_audio"]["w"], grads["towers_audio"]["w"], rtol=1e-6)
  assert int(state.periods) == 1
  np.testing.assert_allclose(state.growth, [1.0, 1.0])
  trace = sum(float(jnp.mean(jnp.square(g))) for g in jax.tree.leaves(grads["towers_audio"]))
  np.testing.assert_allclose(state.traces[0, -1], 2 * trace, rtol=1e-5)


# ------------------------------------------------ CGGM's direction term


def test_cggm_direction_loss_against_a_direct_formula():
  r = np.random.default_rng(3)
  b, c = 6, 4
  logits = r.normal(size=(b, c)).astype(np.float32)
  uni = {m: r.normal(size=(b, c)).astype(np.float32) for m in ("a", "b")}
  labels = r.integers(0, c, b)
  mask = {"a": np.ones(b, bool), "b": np.array([1, 1, 0, 1, 0, 1], bool)}
  loss, metrics = balance.cggm_direction_loss(jnp.asarray(logits), jax.tree.map(
      jnp.asarray, uni), jnp.asarray(labels), jax.tree.map(jnp.asarray, mask))

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  onehot = np.eye(c)[labels]
  cos, acc = [], []
  for m in ("a", "b"):
    p = mask[m]
    g_m, g = (softmax(uni[m]) - onehot)[p], (softmax(logits) - onehot)[p]
    cos.append(np.sum(g_m * g) / np.linalg.norm(g_m) / np.linalg.norm(g))
    acc.append(np.mean(np.argmax(uni[m], -1)[p] == labels[p]))
  weight = (sum(acc) - np.array(acc)) / (sum(acc) + 1e-8)
  want = (np.abs(weight).sum() - (weight * np.array(cos)).sum()) / 2
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cggm/cos/b"]), cos[1], rtol=1e-5)
  grad = jax.grad(lambda x: balance.cggm_direction_loss(
      x, jax.tree.map(jnp.asarray, uni), jnp.asarray(labels),
      jax.tree.map(jnp.asarray, mask))[0])(jnp.asarray(logits))
  assert float(jnp.abs(grad).sum()) > 0    # the term reaches the fused logits


# -------------------------------------------- end to end: K = 3, the train step


def _fusion_config(method="ogm_ge", **balance_fields):
  c = config_lib.load_config(os.path.join(CONFIGS, "fusion_concat.py"), "runlocal")
  c.model.task.unimodal_weight = 1.0
  c.balance.method = method
  for k, v in balance_fields.items():
    setattr(c.balance, k, v)
  return c


def test_three_modalities_through_a_transform():
  r = np.random.default_rng(1)
  grads = {f"towers_{m}": {"w": jnp.asarray(r.normal(size=(3, 2)), jnp.float32)}
           for m in ("audio", "image", "text")}
  grads["fuse"] = {"w": jnp.ones((2, 2))}
  scores = {"audio": 0.2, "image": 0.6, "text": 0.4}
  tx = rules.mlb(("audio", "image", "text"), 1.0)
  out, state = tx.update(grads, tx.init(grads), grads,
                         metrics=_metrics(rules.CONFIDENCE, scores), step=0, rng=None)
  want = balance.mlb_coefficients(jnp.array([0.2, 0.6, 0.4]), 1.0)
  for i, m in enumerate(("audio", "image", "text")):
    np.testing.assert_allclose(out[f"towers_{m}"]["w"], want[i] * grads[f"towers_{m}"]["w"],
                               rtol=1e-6)
  np.testing.assert_array_equal(out["fuse"]["w"], grads["fuse"]["w"])


def test_cggm_trains_through_the_step(mesh8):
  """CGGM on image + audio: magnitude in the optimizer, direction in the loss, through
  the train step's update_args seam."""
  config = config_lib.load_config(os.path.join(CONFIGS, "balance_world.py"), "cggm,runlocal")
  model = experiment.build_model(config)
  featurize = experiment.make_featurize(config)
  from mmjax.data import pipeline
  source = pipeline.make_source(config.data, "train")
  batch = experiment.sample_batch(source, featurize, 16)
  tx = experiment.balance_optimizer(config, opt_lib.make_optimizer(config.optimizer, 10))
  state = step_lib.create_train_state(model, tx, batch, jax.random.key(0), mesh8)
  shapes = jax.eval_shape(lambda p: p, state.params)
  assert {"towers_audio", "towers_image"} <= set(shapes)
  step = step_lib.make_train_step(model, experiment.build_objective(config), config.objective,
                                  mesh8, donate=False, update_args=True)
  new, metrics = step(state, pipeline.to_global(batch, mesh8), jax.random.key(1))
  names = ("audio", "image")
  for m in names:
    assert 0 < float(metrics[f"task/unimodal/{m}/confidence"]) < 1
  assert np.isfinite(float(metrics["cggm/direction_loss"]))
  accuracy = jnp.stack([metrics[f"task/unimodal/{m}/accuracy"] for m in names])
  balance_state = new.opt_state[0]
  np.testing.assert_allclose(balance_state.previous, accuracy)
  np.testing.assert_allclose(balance_state.coefficients, balance.cggm_coefficients(
      accuracy, jnp.zeros(2), 1.3), rtol=1e-5)
  assert int(new.step) == 1


# ------------------------------------------------------------------ bad input


def _check(config):
  balance.check(config)


def test_bad_configs_are_errors_naming_the_field():
  c = _fusion_config()
  c.model.encoders = {"image": c.model.encoders.image}
  with pytest.raises(ValueError, match="the model has one"):
    _check(c)
  with pytest.raises(ValueError, match="balance.modalities: the model has no modality 'depth'"):
    _check(_fusion_config(modalities=("image", "depth")))
  for method, field, value in (("ogm_ge", "alpha", 0.0), ("mlb", "alpha", -1.0),
                               ("inforeg", "threshold", 1.5), ("inforeg", "period", 0),
                               ("cggm", "rho", 0.0), ("cggm", "lamda", -0.1)):
    c = _fusion_config(method)
    setattr(c.balance[method], field, value)
    with pytest.raises(ValueError, match=f"balance.{method}.{field}"):
      _check(c)
  with pytest.raises(ValueError, match="unimodal_weight"):
    c = _fusion_config()
    c.model.task.unimodal_weight = 0.0
    _check(c)
  with pytest.raises(ValueError, match="balance.method='ogm'"):
    _check(_fusion_config("ogm"))
  with pytest.raises(ValueError, match="end_step"):
    _check(_fusion_config(start_step=5, end_step=3))
  assert experiment.balance_optimizer(_fusion_config(""), optax.sgd(1.0)) is not None


# ------------------------------------------------------ the imbalance metrics


def test_imbalance_metrics_of_a_constructed_case():
  from mmjax.evals.evaluators import imbalance
  m = imbalance.imbalance_metrics({"audio": 0.3, "image": 0.9}, 0.95, 0.1, {"audio": 0.6})
  assert m["imbalance_ratio"] == pytest.approx(3.0)
  assert m["audio/gap"] == pytest.approx(0.3) and "image/gap" not in m
  assert m["fused/accuracy"] == 0.95
  # A modality below chance counts as at chance: the ratio stays finite.
  assert imbalance.imbalance_metrics({"a": 0.0, "b": 0.5}, 0.5, 0.1)["imbalance_ratio"] == 5.0
  assert "| audio | 0.300 | 0.600 | +0.300 |" in imbalance.markdown_table(m, ("audio", "image"))


class _Features:
  """A fake model: the image features hold the label, the audio features only noise."""

  def __call__(self, batch):
    import types
    label = batch["label"]
    noise = jnp.sin(batch["index"][:, None] * jnp.arange(1.0, 9.0))
    features = {"image": jnp.concatenate([jax.nn.one_hot(label, 6), noise], 1),
                "audio": jnp.concatenate([noise[:, :6] ** 2, noise], 1)}
    return types.SimpleNamespace(features=features, logits=4.0 * jax.nn.one_hot(label, 6),
                                 logit_scale=jnp.float32(1.0))


def test_imbalance_evaluator_probes_each_encoder(mesh8, tmp_path):
  import ml_collections
  from mmjax.evals import evaluators as evaluators_lib
  c = config_lib.base_config()
  c.data.modalities = ("audio", "image")
  c.data.label = ml_collections.ConfigDict({"factors": ("colour",), "mode": "product",
                                            "num_classes": 0})
  c.data.sizes = ml_collections.ConfigDict({"train": 128, "validation": 64, "test": 64})
  c.data.audio_samples, c.data.image_size = 64, 16
  c.model.encoders = ml_collections.ConfigDict({"audio": config_lib.encoder("audio", "mu"),
                                                "image": config_lib.encoder("vit", "mu")})
  c.evals = ml_collections.ConfigDict({"imbalance": config_lib.evaluator_config(
      "imbalance", batch_size=64, train_examples=128, steps=50, l2_grid=(1e-3,),
      alone=(("audio", 0.5),))})
  built = experiment.build_evaluators(c)
  ctx = experiment.eval_context(c, workdir=str(tmp_path), mesh=mesh8, predict=_Features(),
                                featurize=experiment.make_featurize(c), step=3)
  metrics = evaluators_lib.run_evaluators(ctx, built, force=True)
  assert metrics["eval/imbalance/image/probe_accuracy"] == 1.0
  assert metrics["eval/imbalance/audio/probe_accuracy"] < 0.45
  assert metrics["eval/imbalance/fused/accuracy"] == 1.0
  assert metrics["eval/imbalance/audio/gap"] == pytest.approx(
      0.5 - metrics["eval/imbalance/audio/probe_accuracy"])
  assert "Modality imbalance (imbalance)" in ctx.reports
  bad = config_lib.evaluator_config("imbalance", alone=(("audio", 1.5),))
  c.evals = ml_collections.ConfigDict({"imbalance": bad})
  with pytest.raises(ValueError, match="alone: accuracy of 'audio'"):
    experiment.build_evaluators(c)


@pytest.mark.parametrize("path,arg", [
    ("balance_world.py", v) for v in ("none", "ogm_ge", "mlb", "inforeg", "cggm",
                                      "audio_only", "image_only")] + [
    ("comm_world.py", v) for v in ("comm", "pairwise", "gram")])
def test_the_configs_pass_their_checks(mesh8, path, arg):
  config = config_lib.load_config(os.path.join(CONFIGS, path), arg)
  experiment.check_config(config, mesh8)
  experiment.build_evaluators(config)
  experiment.build_objective(config)
  with pytest.raises(ValueError, match="unknown config variant"):
    config_lib.load_config(os.path.join(CONFIGS, path), "nonesuch")
