"""Objectives from config, GRAM's volume-guided matching, the trimodal configs.

Each objective trains through `trainer.train_and_evaluate` and its logged loss equals a
direct call of the align function on the same embeddings; matching negatives are
never the positive and follow softmax(-volume); bad configs fail with clear errors.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import experiment
from mmjax.data.info import DataInfo
from mmjax import align, config_lib, models
from mmjax.data import pipeline
from mmjax.evals.evaluators import joint_retrieval
from mmjax.models import matching as matching_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import logging as log_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives, trainer
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIMODAL = ("audio", "image", "text")


def _volume_direct(vectors):
  """sqrt(det G) of the explicit Gram matrix, in float64."""
  stacked = np.stack([np.asarray(v, np.float64) for v in vectors])
  return np.sqrt(max(np.linalg.det(stacked @ stacked.T), 0.0))


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


# ---------------------------------------------------------------------------------------
# Drawing negatives.
# ---------------------------------------------------------------------------------------


def test_sample_excluding_follows_softmax_of_allowed_logits():
  logits = jnp.array([[0.5, -1.0, 2.0, 0.0, 1.0], [3.0, 0.0, -2.0, 1.0, 0.5]])
  allowed = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], bool)
  draws = 20_000
  keys = jax.random.split(jax.random.key(0), draws)
  index, found = jax.jit(jax.vmap(
      lambda k: align.sample_excluding(logits, k, allowed=jnp.asarray(allowed))))(keys)
  assert bool(jnp.all(found))
  for r in range(2):
    frequency = np.bincount(np.asarray(index[:, r]), minlength=5) / draws
    expected = np.zeros(5)
    expected[allowed[r]] = _softmax(np.asarray(logits[r])[allowed[r]])
    assert np.all(frequency[~allowed[r]] == 0)
    # Binomial standard deviation <= 0.0036 at 20k draws.
    np.testing.assert_allclose(frequency, expected, atol=0.015)


def test_sample_excluding_row_without_candidates_and_row_keys():
  logits = jnp.zeros((3, 4))
  allowed = jnp.array([[False] * 4, [True] * 4, [True] * 4])
  index, found = align.sample_excluding(logits, jax.random.key(1), allowed=allowed,
                                        row_ids=jnp.array([7, 9, 9]))
  assert found.tolist() == [False, True, True]
  assert int(index[0]) == 0
  assert int(index[1]) == int(index[2])   # same global row, same draw
  with pytest.raises(ValueError, match="allowed must have the shape of logits"):
    align.sample_excluding(logits, jax.random.key(1), allowed=allowed[:2])
  with pytest.raises(ValueError, match="row_ids must have shape"):
    align.sample_excluding(logits, jax.random.key(1), allowed=allowed,
                           row_ids=jnp.arange(4))
  with pytest.raises(ValueError, match=r"logits must be a float array \[R, N\]"):
    align.sample_excluding(logits[0], jax.random.key(1), allowed=allowed[0])


def _trimodal_embeddings(batch, dim=4, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for m in TRIMODAL:
    v = rng.normal(size=(batch, dim))
    out[m] = jnp.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), jnp.float32)
  return out


def test_matching_negatives_exclude_positive_and_follow_softmax_of_minus_volume():
  b, scale = 5, 3.0
  emb = _trimodal_embeddings(b)
  masks = {"image": jnp.array([True, True, True, False, True]),      # 3: no image
           "text": jnp.array([True, True, True, True, False])}       # 4: no anchor
  valid = np.array([True, True, True, True, False])
  # Direct logits -scale * vol(text_i, tuple_j), tuple_j = (audio_j, image_j if present).
  logits = np.array([[-scale * _volume_direct(
      [emb["text"][i], emb["audio"][j]] + ([emb["image"][j]] if masks["image"][j] else []))
      for j in range(b)] for i in range(b)])
  draws = 20_000
  keys = jax.random.split(jax.random.key(2), draws)
  negatives = jax.jit(jax.vmap(lambda k: align.matching_negatives(
      emb, anchor="text", logit_scale=scale, rng=k, masks=masks)))(keys)
  assert np.array_equal(negatives["valid"][0], valid)
  assert np.array_equal(negatives["has_negative"][0], valid)
  for field, table in (("negative_tuple", logits), ("negative_anchor", logits.T)):
    drawn = np.asarray(negatives[field])
    for i in np.flatnonzero(valid):
      candidates = valid & (np.arange(b) != i)
      frequency = np.bincount(drawn[:, i], minlength=b) / draws
      assert np.all(frequency[~candidates] == 0), (field, i)   # never itself or invalid
      expected = np.zeros(b)
      expected[candidates] = _softmax(table[i][candidates])
      np.testing.assert_allclose(frequency, expected, atol=0.015, err_msg=f"{field} {i}")


def test_matching_negatives_same_on_1_and_8_devices(mesh8):
  b = 16
  emb = _trimodal_embeddings(b, dim=8, seed=3)
  masks = {"audio": jnp.arange(b) % 5 != 0}
  rng = jax.random.key(4)

  def negatives(emb, masks):
    return align.matching_negatives(emb, anchor="text", logit_scale=10.0, rng=rng,
                                    masks=masks, axis_name="data")

  sharded = jax.jit(jax.shard_map(negatives, mesh=mesh8, in_specs=(P("data"), P("data")),
                                  out_specs=P("data")))(emb, masks)
  single = jax.jit(lambda emb, masks: align.matching_negatives(
      emb, anchor="text", logit_scale=10.0, rng=rng, masks=masks))(emb, masks)
  for k in single:
    np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(single[k]), err_msg=k)
  assert np.all(np.asarray(single["negative_tuple"]) != np.arange(b))


def _bce_direct(positive, negative_tuple, negative_anchor, valid, has_negative):
  terms = []
  for i in range(len(valid)):
    if valid[i]:
      terms.append(-math.log(1 / (1 + math.exp(-positive[i]))))
    if valid[i] and has_negative[i]:
      terms += [-math.log(1 - 1 / (1 + math.exp(-z)))
                for z in (negative_tuple[i], negative_anchor[i])]
  return sum(terms) / len(terms)


def test_matching_loss_is_bce_over_contributed_pairs(mesh8):
  keys = jax.random.split(jax.random.key(5), 3)
  logits = [2 * jax.random.normal(k, (16,)) for k in keys]
  valid = jnp.arange(16) % 4 != 1
  has_negative = valid & (jnp.arange(16) != 6)
  loss, metrics = align.matching_loss(*logits, valid=valid, has_negative=has_negative)
  direct = _bce_direct(*[np.asarray(x) for x in logits], np.asarray(valid),
                       np.asarray(has_negative))
  assert float(loss) == pytest.approx(direct, rel=1e-5)
  right = (np.sum(np.asarray(logits[0])[np.asarray(valid)] > 0) +
           sum(np.sum(np.asarray(x)[np.asarray(has_negative)] < 0) for x in logits[1:]))
  count = np.sum(np.asarray(valid)) + 2 * np.sum(np.asarray(has_negative))
  assert float(metrics["accuracy"]) == pytest.approx(right / count)

  sharded = jax.jit(jax.shard_map(
      lambda *a: align.matching_loss(*a[:3], valid=a[3], has_negative=a[4],
                                     axis_name="data")[0],
      mesh=mesh8, in_specs=(P("data"),) * 5, out_specs=P()))(*logits, valid, has_negative)
  assert float(sharded) == pytest.approx(direct, rel=1e-5)
  with pytest.raises(ValueError, match="must all have shape"):
    align.matching_loss(logits[0], logits[1][:8], logits[2], valid=valid,
                        has_negative=has_negative)


# ---------------------------------------------------------------------------------------
# Objectives on hand-made model outputs.
# ---------------------------------------------------------------------------------------


def _objective_config(**fields):
  c = config_lib.base_config().objective
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def _matcher(features, rng):
  """A matching head with NumPy-filled params (its shapes from eval_shape: no init to
  compile); the logit layer is not zero, so pairs are told apart by their inputs."""
  head = matching_lib.MatchingHead(width=8, tokens=2, num_heads=2)
  shapes = jax.eval_shape(lambda f: head.init(jax.random.key(6), "text", f["text"],
                                              {m: f[m] for m in ("audio", "image")}),
                          features)["params"]
  fill = np.random.default_rng(7)
  params = jax.tree.map(
      lambda s: jnp.asarray(fill.normal(scale=0.5, size=s.shape), jnp.float32), shapes)
  return matching_lib.Matcher(params=params, rng=rng, head=head)


def _trimodal_output(b=8, with_matcher=True):
  emb = _trimodal_embeddings(b, dim=6, seed=8)
  rng = np.random.default_rng(9)
  features = {m: jnp.asarray(rng.normal(size=(b, 5 + i)), jnp.float32)
              for i, m in enumerate(TRIMODAL)}
  matcher = _matcher(features, jax.random.key(10)) if with_matcher else None
  return models.ModelOutput(embeddings=emb, features=features,
                            logit_scale=jnp.float32(4.0), matcher=matcher)


def _matching_direct(out, masks, anchor="text"):
  """The matching loss computed pair by pair from the same draws."""
  others = ("audio", "image")

  @jax.jit
  def pair_logits(out, masks):
    neg = align.matching_negatives(out.embeddings, anchor=anchor,
                                   logit_scale=out.logit_scale, rng=out.matcher.rng,
                                   masks=masks)
    f, t, a = out.features, neg["negative_tuple"], neg["negative_anchor"]
    rows = jnp.arange(t.shape[0])

    def score(anchor_rows, tuple_rows):
      return out.matcher(anchor, f[anchor][anchor_rows],
                         {m: f[m][tuple_rows] for m in others},
                         {m: masks[m][tuple_rows] for m in others})

    return (score(rows, rows), score(rows, t), score(a, rows), neg["valid"],
            neg["has_negative"])

  return _bce_direct(*[np.asarray(x) for x in pair_logits(out, masks)])


def test_gram_plus_matching_is_the_weighted_sum_of_direct_losses():
  out = _trimodal_output()
  masks = {m: jnp.ones((8,), bool) for m in TRIMODAL}
  masks["image"] = masks["image"].at[2].set(False)
  config = _objective_config(kind="gram+matching", anchor="text", label_smoothing=0.1,
                             weights=ml_collections.ConfigDict({"matching": 0.5}))
  loss, metrics = jax.jit(
      lambda out, masks: objectives.get(config.kind)(out, {"mask": masks}, config))(
          out, masks)
  gram, _ = jax.jit(lambda e, m: align.gram_loss(
      e, anchor="text", logit_scale=4.0, label_smoothing=0.1, masks=m))(out.embeddings,
                                                                         masks)
  matching = _matching_direct(out, masks)
  assert float(metrics["gram/loss"]) == pytest.approx(float(gram), rel=1e-5)
  assert float(metrics["matching/loss"]) == pytest.approx(matching, rel=1e-5)
  assert float(loss) == pytest.approx(float(gram) + 0.5 * matching, rel=1e-5)


def test_gram_objective_passes_negatives_gradient():
  out = _trimodal_output(with_matcher=False)
  assert config_lib.base_config().objective.negatives_gradient is True

  def grads(fn):
    return jax.jit(jax.grad(lambda e: fn(out.replace(embeddings=e))))(out.embeddings)

  by_config = {}
  for exact in (True, False):
    config = _objective_config(kind="gram", anchor="text", label_smoothing=0.1,
                               negatives_gradient=exact)
    objective = objectives.build(config)
    by_config[exact] = grads(lambda o: objective(o, {}, config)[0])
    direct = grads(lambda o, exact=exact: align.gram_loss(
        o.embeddings, anchor="text", logit_scale=o.logit_scale, label_smoothing=0.1,
        negatives_gradient=exact)[0])
    for m in TRIMODAL:
      np.testing.assert_allclose(by_config[exact][m], direct[m], rtol=1e-5, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(by_config[True][m] - by_config[False][m])))
             for m in TRIMODAL) > 1e-3


def test_matching_objective_on_8_devices_equals_1_device(mesh8):
  """Drawn negatives may live on another device: values and feature gradients agree."""
  out = _trimodal_output(b=16)
  masks = {m: jnp.ones((16,), bool) for m in TRIMODAL}
  config = _objective_config(kind="matching", anchor="text")
  matcher = out.matcher

  def loss_fn(embeddings, features, masks, axis_name=None):
    o = models.ModelOutput(embeddings=embeddings, features=features,
                           logit_scale=jnp.float32(4.0), matcher=matcher)
    return objectives.get("matching")(o, {"mask": masks}, config, axis_name=axis_name)[0]

  single, single_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=1))(
      out.embeddings, out.features, masks)
  sharded_fn = jax.shard_map(
      jax.value_and_grad(lambda e, f, m: loss_fn(e, f, m, "data"), argnums=1),
      mesh=mesh8, in_specs=(P("data"),) * 3, out_specs=(P(), P("data")))
  sharded, sharded_grad = jax.jit(sharded_fn)(out.embeddings, out.features, masks)
  assert float(sharded) == pytest.approx(float(single), rel=1e-5)
  for m in TRIMODAL:
    np.testing.assert_allclose(sharded_grad[m], single_grad[m], atol=1e-6, err_msg=m)
  assert float(jnp.abs(single_grad["audio"]).sum()) > 0


def _pair_output(modalities=("image", "text"), logit_bias=None):
  emb = _trimodal_embeddings(6, seed=11)
  return models.ModelOutput(embeddings={m: emb[m] for m in modalities}, features={},
                            logit_scale=jnp.float32(10.0), logit_bias=logit_bias)


def test_siglip_and_pairwise_equal_direct_calls():
  out = _pair_output(logit_bias=jnp.float32(-3.0))
  loss, _ = objectives.get("siglip")(out, {}, _objective_config(kind="siglip"))
  direct, _ = align.siglip_loss(out.embeddings["image"], out.embeddings["text"],
                                logit_scale=10.0, logit_bias=-3.0)
  assert float(loss) == pytest.approx(float(direct), rel=1e-6)

  out = _trimodal_output(with_matcher=False)
  config = _objective_config(kind="pairwise", anchor="text", label_smoothing=0.1)
  loss, metrics = objectives.get("pairwise")(out, {}, config)
  direct = np.mean([float(align.clip_loss(out.embeddings[m], out.embeddings["text"],
                                          logit_scale=4.0, label_smoothing=0.1)[0])
                    for m in ("audio", "image")])
  assert float(loss) == pytest.approx(direct, rel=1e-6)
  assert "pairwise/image->text/accuracy" in metrics
  config.pairs = "all"
  loss, _ = objectives.get("pairwise")(out, {}, config)
  direct = np.mean([float(align.clip_loss(out.embeddings[a], out.embeddings[b],
                                          logit_scale=4.0, label_smoothing=0.1)[0])
                    for a, b in (("audio", "image"), ("audio", "text"), ("image", "text"))])
  assert float(loss) == pytest.approx(direct, rel=1e-6)


BAD_OBJECTIVES = [
    # (model, objective fields, expected error)
    ("trimodal", dict(kind="clip"), "'clip' aligns two modalities; the model has "
                                    r"\['audio', 'image', 'text'\]"),
    ("trimodal", dict(kind="siglip"), "'siglip' aligns two modalities"),
    ("pair", dict(kind="siglip"), "needs a learned logit bias: set model.logit_bias_init"),
    ("pair_bias", dict(kind="siglip", label_smoothing=0.1),
     r"objective.label_smoothing=0.1 is not a field of objective.kind 'siglip'"),
    ("trimodal", dict(kind="gram"), "'gram' needs objective.anchor"),
    ("trimodal", dict(kind="gram", anchor="video"),
     r"objective.anchor 'video' is not among the model's modalities"),
    ("pair", dict(kind="clip", anchor="audio"),
     "objective.anchor='audio' is not a field of objective.kind 'clip'"),
    ("trimodal", dict(kind="pairwise"), "'pairwise' needs objective.anchor"),
    ("trimodal", dict(kind="pairwise", anchor="text", pairs="some"),
     "objective.pairs must be 'anchor' or 'all'"),
    ("trimodal", dict(kind="pairwise", anchor="text", pair_kind="hinge"),
     "objective.pair_kind must be 'clip' or 'siglip'"),
    ("trimodal_plain", dict(kind="matching", anchor="text"),
     "needs the model's matching head: set model.matching"),
    ("trimodal", dict(kind="gram+matching", anchor="text",
                      weights=ml_collections.ConfigDict({"matchng": 1.0})),
     r"objective.weights has \['matchng'\], which objective.kind 'gram\+matching' does "
     "not name"),
    ("trimodal", dict(kind="gram+matching", anchor="text",
                      weights=ml_collections.ConfigDict({"gram": -1.0})),
     "objective.weights.gram must be a number >= 0"),
    ("pair", dict(kind="clip", label_smoothing=1.5), r"label_smoothing must be in \[0, 1\)"),
    ("trimodal", dict(kind="pairwise", anchor="text", pair_kind="siglip"),
     "uses the sigmoid loss, which needs a learned logit bias"),
    ("pair", dict(kind="task"), "needs task logits: set model.fusion and model.task"),
]


def _model_config(which):
  c = config_lib.base_config().model
  if which.startswith("trimodal"):
    c.encoders.audio = config_lib.encoder("audio", "mu")
  if which == "trimodal":
    c.matching = ml_collections.ConfigDict({"width": 8})
  if which == "pair_bias":
    c.logit_bias_init = -10.0
  return c


@pytest.mark.parametrize("which, fields, error", BAD_OBJECTIVES)
def test_bad_objective_config_is_a_clear_error(which, fields, error):
  with pytest.raises(ValueError, match=error):
    objectives.build(_objective_config(**fields), _model_config(which))


def test_an_unknown_objective_field_is_an_error():
  config = ml_collections.ConfigDict({"kind": "clip", "weights": {}, "temperature": 0.07})
  with pytest.raises(ValueError, match=r"objective.temperature: no objective has this field"):
    objectives.build(config)
  # A field at its default is ignored by the objectives that do not read it, so a config
  # switches objectives by `kind` alone.
  config = _objective_config(kind="siglip")
  assert objectives.build(config) is objectives.OBJECTIVES["siglip"].obj


def test_base_config_lists_every_objective_field_at_its_default():
  c = config_lib.base_config().objective
  for name, entry in objectives.OBJECTIVES.items():
    for field, default in entry.fields.items():
      assert c[field] == default, (name, field)


def test_unknown_objective_names_are_errors(mesh8):
  with pytest.raises(ValueError, match=r"unknown objective 'volume'.*valid: \[.*'gram'"):
    objectives.get("volume")
  with pytest.raises(ValueError, match="unknown objective 'matchin' in 'gram\\+matchin'"):
    objectives.get("gram+matchin")
  with pytest.raises(ValueError, match="names an objective twice"):
    objectives.get("gram+gram")
  config = _tiny_config()
  config.objective.kind = "grm"
  with pytest.raises(ValueError, match="objective.kind: unknown objective 'grm'"):
    objectives.build(config.objective, config.model)


def test_matching_head_config_errors():
  c = _tiny_config()
  c.model.matching = ml_collections.ConfigDict({"widht": 8})
  with pytest.raises(ValueError, match=r"model.matching: unknown field\(s\) \['widht'\]"):
    models.build(c.model)
  c.model.matching = ml_collections.ConfigDict()
  del c.model.encoders["audio"]
  del c.model.encoders["image"]
  with pytest.raises(ValueError, match="model.matching scores an anchor against the other"):
    models.build(c.model)


# ---------------------------------------------------------------------------------------
# Through the trainer.
# ---------------------------------------------------------------------------------------


def _tiny_config(modalities=TRIMODAL):
  """A seconds-long config on 8 devices: tiny towers, short audio, no evals."""
  c = config_lib.base_config()
  c.name = "tiny_objectives"
  c.total_steps = 3
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 1000
  c.data.modalities = tuple(modalities)
  c.data.sizes.train = 1000
  c.data.sizes.test = 64
  c.data.text_max_len = 48
  c.data.audio_samples = 1024
  c.data.num_threads = 1
  c.model.embed_dim = 16
  encoders = {
      "image": config_lib.encoder("vit", "mu", patch_size=8, width=16, depth=1,
                                  num_heads=2),
      "text": config_lib.encoder("text", "mu", width=16, depth=1, num_heads=2,
                                 max_len=48, causal=False, pool="mean"),
      "audio": config_lib.encoder("audio", "mu", width=16, depth=1, num_heads=2,
                                  sample_rate=c.data.sample_rate, n_fft=128, hop=128,
                                  n_mels=16, patch_size=(8, 8), max_frames=8,
                                  time_masks=0, freq_masks=0),
  }
  for m in list(c.model.encoders.keys()):
    del c.model.encoders[m]
  for m in modalities:
    c.model.encoders[m] = encoders[m]
  del c.evals["retrieval"]
  return c


def _restore_step(config, workdir, step):
  """The params saved at `step` and the batch the next step trained on (host numpy)."""
  mesh = mesh_lib.make_mesh(config.mesh)
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, "train")
  data_iter = iter(pipeline.train_dataset(source, featurize, seed=config.seed,
                                          global_batch_size=config.batch_size,
                                          num_threads=1))
  model = models.build(config.model)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
  sample = experiment.sample_batch(source, featurize)
  # The restore target from shapes alone (no init to compile), replicated as saved.
  shapes = jax.eval_shape(lambda: step_lib.TrainState.create(
      apply_fn=model.apply, tx=tx,
      params=step_lib.init_variables(model, sample, jax.random.key(0))["params"]))
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
  manager = ckpt_lib.make_manager(workdir, read_only=True)
  state = ckpt_lib.restore(manager, step, abstract, data_iter)
  # The towers have no dropout, so train=False embeds as the train step did.
  params = jax.device_get(state.params)
  batch = next(data_iter)
  out = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))(params, batch)
  return out, batch


def _train(config, workdir):
  """Trains; returns the final metrics and the logged rows by step."""
  final = trainer.train_and_evaluate(config, workdir)
  rows = {r["step"]: r for r in log_lib.read_metrics(workdir) if "train/loss" in r}
  assert all(np.isfinite(r["train/loss"]) for r in rows.values())
  return final, rows


def test_siglip_from_config_trains_and_equals_direct_call(tmp_path):
  config = _tiny_config(("image", "text"))
  config.objective.kind = "siglip"
  config.model.logit_scale_init, config.model.logit_bias_init = align.siglip_init()
  _, rows = _train(config, str(tmp_path))
  assert sorted(rows) == [1, 2, 3]
  # Step 3 trained on the batch after the step-2 checkpoint, with the step-2 params.
  out, _ = _restore_step(config, str(tmp_path), 2)
  direct, _ = jax.jit(lambda x, y, s, b: align.siglip_loss(
      x, y, logit_scale=s, logit_bias=b))(out.embeddings["image"], out.embeddings["text"],
                                          out.logit_scale, out.logit_bias)
  assert rows[3]["train/loss"] == pytest.approx(float(direct), rel=1e-4)
  assert rows[3]["train/logit_bias"] == pytest.approx(float(out.logit_bias))
  assert rows[1]["train/logit_bias"] == pytest.approx(align.SIGLIP_INIT_LOGIT_BIAS, abs=0.1)


def test_pairwise_from_config_trains_and_equals_direct_call(tmp_path):
  config = _tiny_config()
  config.objective.kind = "pairwise"
  config.objective.anchor = "text"
  config.objective.label_smoothing = 0.1
  _, rows = _train(config, str(tmp_path))
  out, _ = _restore_step(config, str(tmp_path), 2)
  direct, _ = jax.jit(lambda e, s: align.pairwise_loss(
      e, anchor="text", logit_scale=s, label_smoothing=0.1))(out.embeddings,
                                                             out.logit_scale)
  assert rows[3]["train/loss"] == pytest.approx(float(direct), rel=1e-4)
  assert "train/pairwise/audio->text/accuracy" in rows[3]


def test_trimodal_gram_with_matching_learns_and_equals_direct_call(tmp_path):
  """A short GRAM + matching run from config: above chance on joint retrieval, and the
  logged GRAM term equals `gram_loss` on the same embeddings."""
  config = _tiny_config()
  config.total_steps = 100
  config.batch_size = 32
  config.log_every_steps = 20
  config.checkpoint_every_steps = 99
  config.objective.kind = "gram+matching"
  config.objective.anchor = "text"
  config.objective.label_smoothing = 0.1
  config.objective.weights = ml_collections.ConfigDict({"gram": 1.0, "matching": 0.5})
  config.model.matching = ml_collections.ConfigDict({"width": 8, "tokens": 2,
                                                     "num_heads": 2})
  config.optimizer.lr = 5e-3
  config.optimizer.warmup_steps = 10
  for m in TRIMODAL:     # two factors: learnable in a hundred steps
    config.data.expresses[m] = ("colour", "position")
  config.evals.retrieval = ml_collections.ConfigDict({
      "kind": "joint_retrieval", "split": "test", "batch_size": 32,
      "joint": ("text->image+audio",), "pairs": (("image", "text"),)})
  workdir = str(tmp_path)
  final, rows = _train(config, workdir)

  chance = 1 / config.data.sizes.test
  joint = "eval/retrieval/text->image+audio"
  assert final[f"{joint}/R@5"] > 2 * 5 * chance, final
  assert final[f"{joint}/R@10"] > 2 * 10 * chance, final
  assert final[f"{joint}/mean_rank"] < 0.75 * (1 + config.data.sizes.test) / 2, final
  assert 0 < final[f"{joint}/R@1_ceiling"] <= 1
  assert rows[100]["train/gram/loss"] < rows[20]["train/gram/loss"]

  out, batch = _restore_step(config, workdir, 99)
  direct, _ = jax.jit(lambda e, s, m: align.gram_loss(
      e, anchor="text", logit_scale=s, label_smoothing=0.1, masks=m))(
          out.embeddings, out.logit_scale, batch["mask"])
  logged = rows[100]
  assert logged["train/gram/loss"] == pytest.approx(float(direct), rel=1e-4)
  # The matching term draws with the step's dropout rng; its value against a direct
  # computation is tested above. Here: the weighted sum.
  assert logged["train/loss"] == pytest.approx(
      logged["train/gram/loss"] + 0.5 * logged["train/matching/loss"], rel=1e-5)
  assert 0 < logged["train/matching/loss"] < 1


# ---------------------------------------------------------------------------------------
# The trimodal configs and joint retrieval.
# ---------------------------------------------------------------------------------------


def _load_config(name, arg=None):
  return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)


@pytest.mark.parametrize("arg", [None, "runlocal", "matching,runlocal"])
def test_trimodal_configs_share_model_data_and_budget(arg, mesh8):
  gram, pairwise = _load_config("gram_trimodal", arg), _load_config("pairwise_trimodal", arg)
  matching = "matching" in (arg or "")
  assert gram.objective.kind == ("gram+matching" if matching else "gram")
  assert pairwise.objective.kind == ("pairwise+matching" if matching else "pairwise")
  assert gram.objective.anchor == pairwise.objective.anchor == "text"
  assert sorted(gram.model.encoders.keys()) == list(TRIMODAL)
  def plain(v):
    return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v

  for field in ("model", "data", "optimizer", "evals", "total_steps", "batch_size"):
    assert plain(gram[field]) == plain(pairwise[field]), field
  for c in (gram, pairwise):
    experiment.check_config(c, mesh8)
    objectives.build(c.objective, c.model)
    models.build(c.model)
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['fast'\]"):
    _load_config("gram_trimodal", "fast")


def test_joint_retrieval_spec_and_score_choice():
  assert joint_retrieval.parse_joint("text->image+audio", TRIMODAL) == (
      "text", ("image", "audio"))
  with pytest.raises(ValueError, match="produces no 'video' embeddings"):
    joint_retrieval.parse_joint("text->image+video", TRIMODAL)
  with pytest.raises(ValueError, match="write it as 'query->target"):
    joint_retrieval.parse_joint("text:image", TRIMODAL)
  with pytest.raises(ValueError, match="must be distinct"):
    joint_retrieval.parse_joint("text->text+audio", TRIMODAL)
  assert joint_retrieval.default_joint("text", TRIMODAL) == ("text->audio+image",)
  assert len(joint_retrieval.default_joint(None, TRIMODAL)) == 3
  assert joint_retrieval.resolve_score("auto", "gram+matching") == "volume"
  assert joint_retrieval.resolve_score("auto", "pairwise") == "sum_cosine"
  with pytest.raises(ValueError, match="score must be 'auto' or one of"):
    joint_retrieval.resolve_score("cosine", "gram")


class _StubContext:
  """What the retrieval evaluators read from an `EvalContext`, with fixed outputs."""

  def __init__(self, objective, outputs):
    self.objective, self.anchor, self._outputs = objective, "text", outputs
    self.modalities = tuple(sorted(outputs["embeddings"]))
    self.data = DataInfo(name="stub")
    self.mesh, self.name, self.step, self.writes_files = None, "retrieval", 0, False
    self._cache = {}

  def source(self, split):      # a source with one text per example (no `all_texts`)
    del split
    return object()

  def outputs(self, split, batch_size):
    del split, batch_size
    return self._outputs


def _direct_recall_at_1(scores):
  """Pessimistic ranks: rank_i = #{j : s_ij >= s_ii}."""
  scores = np.asarray(scores)
  ranks = np.sum(scores >= np.diag(scores)[:, None], axis=1)
  return float(np.mean(ranks <= 1))


@pytest.mark.parametrize("score", ["volume", "sum_cosine"])
def test_joint_retrieval_evaluator_equals_direct_ranks(score):
  n = 24
  keys = jax.random.split(jax.random.key(12), 4)
  latent = jax.random.normal(keys[0], (n, 4))
  emb = {m: np.asarray(models.l2_normalize(latent + 0.9 * jax.random.normal(k, (n, 4))))
         for m, k in zip(TRIMODAL, keys[1:])}
  mask = {m: np.ones(n, bool) for m in TRIMODAL}
  mask["audio"][[3, 17]] = False          # left out of the joint query
  keep = np.flatnonzero(mask["audio"])
  outputs = {"embeddings": emb, "mask": mask, "factors": None}
  eval_config = config_lib.evaluator_config(
      "joint_retrieval", batch_size=8, joint=("text->image+audio",), score=score,
      plot_max_k=0)
  metrics = joint_retrieval.joint_retrieval(_StubContext("gram", outputs), eval_config)
  t, i, a = (emb[m][keep] for m in ("text", "image", "audio"))
  if score == "volume":
    scores = -np.array([[_volume_direct([t[q], i[j], a[j]]) for j in range(len(keep))]
                        for q in range(len(keep))])
  else:
    scores = t @ i.T + t @ a.T
  assert metrics["text->image+audio/R@1"] == pytest.approx(_direct_recall_at_1(scores))
  assert "text->image/R@1" in metrics and "audio->image/R@1" in metrics
  assert "text->image+audio/R@1_ceiling" not in metrics      # no factors given


def test_joint_ceiling_uses_the_factors_the_targets_express_together():
  from mmjax.data import world as world_lib  # pylint: disable=g-import-not-at-top
  from mmjax.data.world_info import data_info as pipeline_data_info  # pylint: disable=g-import-not-at-top
  spec = world_lib.WorldSpec(expresses={"text": world_lib.FACTOR_NAMES,
                                        "image": ("shape", "position"),
                                        "audio": ("colour",)})
  source = world_lib.World(spec, "test")
  factors = np.stack([source.factors(i) for i in range(200)])
  ceiling = pipeline_data_info(spec).retrieval_ceiling
  assert ceiling("text", ("image", "audio"), factors) == (
      world_lib.oracle_recall_at_1(factors, ("shape", "colour", "position")))
  assert ceiling("text", ("image", "audio"), factors) > (
      world_lib.oracle_recall_at_1(factors, ("shape", "position")))


def test_siglip_config_is_the_default_with_sigmoid_loss(mesh8):
  siglip, default = _load_config("siglip", "runlocal"), _load_config("default", "runlocal")
  assert siglip.objective.kind == "siglip"
  assert siglip.model.logit_bias_init == align.SIGLIP_INIT_LOGIT_BIAS
  assert siglip.model.logit_scale_init == pytest.approx(math.log(10.0))
  assert siglip.model.encoders.to_dict() == default.model.encoders.to_dict()
  experiment.check_config(siglip, mesh8)
  models.build(siglip.model)
