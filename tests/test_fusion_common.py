"""Masks, combinations, modality dropout, input checks, registry and task heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import fusion


def _key(seed):
  # rbg keys: threefry kernels take seconds to compile on small CPU machines.
  return jax.random.key(seed, impl="rbg")


def _mask(rows):
  """rows: list of 'abc'-style strings of present modalities."""
  return {m: jnp.array([m in r for r in rows]) for m in "abc"}


def test_combination_index_is_sorted_name_bitmask():
  mask = {"text": jnp.array([1, 0, 1, 1], bool), "audio": jnp.array([0, 1, 1, 0], bool),
          "image": jnp.array([0, 0, 1, 1], bool)}
  # sorted: audio -> bit 0, image -> bit 1, text -> bit 2.
  np.testing.assert_array_equal(fusion.combination_index(mask), [4, 1, 7, 6])
  stacked = fusion.stack_mask(mask)
  np.testing.assert_array_equal(stacked[:, 2], mask["text"])


def test_check_mask_raises_on_sample_without_modality():
  mask = _mask(["a", "", "bc", ""])
  with pytest.raises(ValueError, match=r"2 sample\(s\) have no modality present.*\[1, 3\]"):
    fusion.check_mask(mask)
  fusion.check_mask(mask, allow_none=True)
  fusion.check_mask(_mask(["a", "b"]))
  # Under jit values are abstract: no check (documented), no error.
  jax.jit(lambda m: fusion.check_mask(m) or 0)(mask)


def test_masked_mean_matches_direct_formula_and_handles_empty_rows():
  x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  present = jnp.array([[True, False, True], [False, False, False]])
  out = fusion.masked_mean(x, present)
  np.testing.assert_allclose(out[0], (x[0, 0] + x[0, 2]) / 2)
  np.testing.assert_array_equal(out[1], [0.0, 0.0])


def test_stack_modalities_zero_fills_and_orders_by_name():
  feats = {"b": jnp.full((2, 3), jnp.nan), "a": jnp.ones((2, 3))}
  mask = {"b": jnp.array([False, True]), "a": jnp.array([True, True])}
  feats["b"] = feats["b"].at[1].set(2.0)
  names, x, present = fusion.stack_modalities(feats, mask)
  assert names == ("a", "b")
  np.testing.assert_array_equal(x[0, 1], 0.0)  # NaN garbage replaced, not multiplied
  np.testing.assert_array_equal(x[1, 1], 2.0)
  np.testing.assert_array_equal(present, [[True, False], [True, True]])


@pytest.mark.parametrize("features, mask, match", [
    ({"a": jnp.ones((2, 4)), "b": jnp.ones((2, 4))}, {"a": jnp.ones(2, bool)},
     r"mask lacks modality \['b'\]"),
    ({"a": jnp.ones((2, 4))}, {"a": jnp.ones(2, bool), "c": jnp.ones(2, bool)},
     r"features lack modality \['c'\]"),
    ({"a": jnp.ones((2,))}, {"a": jnp.ones(2, bool)}, r"features\['a'\] must have shape \[B, D\]"),
    ({"a": jnp.ones((2, 4)), "b": jnp.ones((2, 5))}, {"a": jnp.ones(2, bool), "b": jnp.ones(2, bool)},
     "share one shape"),
    ({"a": jnp.ones((2, 4))}, {"a": jnp.ones(2, jnp.int32)}, r"mask\['a'\] must be bool"),
    ({"a": jnp.ones((2, 4))}, {"a": jnp.ones(3, bool)}, "batch size 3"),
    ({"a": jnp.ones((2, 4), jnp.int32)}, {"a": jnp.ones(2, bool)}, "floating point"),
])
def test_stack_modalities_rejects_bad_input(features, mask, match):
  with pytest.raises(ValueError, match=match):
    fusion.stack_modalities(features, mask)


def test_stack_modalities_checks_configured_modalities():
  feats = {"a": jnp.ones((2, 4))}
  with pytest.raises(ValueError, match=r"configured for modalities \['a', 'b'\]"):
    fusion.stack_modalities(feats, {"a": jnp.ones(2, bool)}, modalities=("a", "b"))


def test_modality_dropout_rate_subset_and_keep_one():
  batch = 4000
  mask = {m: jnp.ones(batch, bool) for m in "abc"}
  mask["c"] = mask["c"].at[: batch // 2].set(False)
  dropout = jax.jit(fusion.modality_dropout, static_argnames=("rate", "keep_at_least_one"))
  out = dropout(mask, 0.3, _key(0))
  stacked_in, stacked_out = fusion.stack_mask(mask), fusion.stack_mask(out)
  assert not np.any(np.asarray(stacked_out & ~stacked_in))      # only ever removes
  assert np.all(np.asarray(stacked_out.any(axis=1)))             # never empties a row
  full = np.asarray(stacked_in.all(axis=1))
  # Dropped fraction ~ 0.3, slightly less where all three were dropped and one
  # came back: 0.3 - 0.3**3 / 3 = 0.291.
  dropped = 1 - np.asarray(stacked_out)[full].mean()
  assert abs(dropped - 0.291) < 0.02, dropped
  same = dropout(mask, 0.0, _key(1))
  np.testing.assert_array_equal(fusion.stack_mask(same), stacked_in)
  # Without the guard a high rate empties rows.
  loose = dropout(mask, 0.9, _key(2), keep_at_least_one=False)
  assert not np.all(np.asarray(fusion.stack_mask(loose).any(axis=1)))
  with pytest.raises(ValueError, match="rate must be in"):
    fusion.modality_dropout(mask, 1.0, _key(0))


def test_modality_dropout_restores_uniformly_among_present():
  batch = 6000
  mask = {m: jnp.ones(batch, bool) for m in "abc"}
  out = fusion.stack_mask(jax.jit(fusion.modality_dropout, static_argnames="rate")(
      mask, 0.95, _key(3)))
  kept_counts = np.asarray(out).sum(axis=0) / batch
  np.testing.assert_allclose(kept_counts, kept_counts.mean(), atol=0.03)


def test_build_fusion_rejects_unknown_kind_and_fields():
  with pytest.raises(ValueError, match="unknown fusion kind 'sum'"):
    fusion.build_fusion("sum")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_expert'\]"):
    fusion.build_fusion("moe", num_expert=4)
  with pytest.raises(ValueError, match=r"'late' needs field\(s\) \['num_classes'\]"):
    fusion.build_fusion("late")
  assert fusion.build_fusion(**{"kind": "moe", "num_experts": 3}).num_experts == 3
  module = fusion.build_fusion("attention", modalities=["b", "a"])
  assert module.modalities == ("b", "a")
  assert set(fusion.FUSION_KINDS) == {"concat", "mean", "late", "attention", "ovo",
                                      "moe", "flexmoe", "gated", "bottleneck",
                                      "cross_attention", "joint", "ovo_tokens", "mmp",
                                      "proxy"}


@pytest.mark.parametrize("kind, config, match", [
    ("moe", {"num_experts": 4, "top_k": 5}, "top_k=5 is larger than the number of experts"),
    ("moe", {"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ("moe", {"capacity_factor": -1.0}, "capacity_factor must be > 0"),
    ("flexmoe", {"num_experts": 3, "top_k": 4}, "top_k=4 is larger"),
    ("flexmoe", {"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ("flexmoe", {"num_experts": 3, "modalities": ("a", "b", "c")}, "one expert per modality"),
    ("concat", {"num_layers": 0}, "num_layers must be >= 1"),
    ("attention", {"dropout_rate": 1.0}, "dropout_rate"),
    ("gated", {"temperature": 0.0}, "temperature must be > 0"),
    ("gated", {"project": False, "out_dim": 4}, "out_dim needs project=True"),
    ("late", {"num_classes": 0}, None),
])
def test_build_fusion_rejects_bad_values(kind, config, match):
  if kind == "late":  # the per-modality head checks num_classes when it is built
    module = fusion.build_fusion(kind, **config)
    feats = {"a": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
      module.init(_key(0), feats, {"a": jnp.ones(2, bool)})
    return
  with pytest.raises(ValueError, match=match):
    fusion.build_fusion(kind, **config)


def test_task_head_per_modality_matches_separate_heads():
  x = jax.random.normal(_key(0), (5, 3, 4))
  head = fusion.TaskHead(2, num_modalities=3)
  variables = jax.jit(head.init)(_key(1), x)
  out = jax.jit(head.apply)(variables, x)
  assert out.shape == (5, 3, 2)
  kernel = variables["params"]["out"]["kernel"]
  bias = variables["params"]["out"]["bias"]
  for m in range(3):
    np.testing.assert_allclose(out[:, m], x[:, m] @ kernel[m] + bias[m], rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match=r"expects \[B, 3, D\]"):
    head.apply(variables, x[:, :2])
  with pytest.raises(ValueError, match="kind must be one of"):
    fusion.TaskHead(2, kind="ranking")


def test_task_loss_against_formulas():
  logits_np = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  logits, labels = jnp.asarray(logits_np, jnp.float32), jnp.array([0, 2])
  loss = jax.jit(fusion.task_loss, static_argnames="kind")
  log_probs = logits_np - np.log(np.exp(logits_np).sum(1, keepdims=True))
  expected = -(log_probs[0, 0] + log_probs[1, 2]) / 2
  np.testing.assert_allclose(loss(logits, labels), expected, rtol=1e-6)
  targets_np = np.array([[1, 0, 1], [0, 0, 1]])
  targets = jnp.asarray(targets_np)
  p = 1 / (1 + np.exp(-logits_np))
  bce = -(targets_np * np.log(p) + (1 - targets_np) * np.log(1 - p)).mean()
  np.testing.assert_allclose(loss(logits, targets, kind="multilabel"), bce, rtol=1e-5)
  np.testing.assert_allclose(loss(logits, targets * 1.0, kind="regression"),
                             ((logits_np - targets_np) ** 2).mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="classification targets must be int"):
    fusion.task_loss(logits, labels.astype(jnp.float32))
  with pytest.raises(ValueError, match="targets must have the outputs' shape"):
    fusion.task_loss(logits, targets[:, :2], "regression")


def test_build_fusion_from_config_projects_and_adds_task_head():
  feats = {"a": jnp.ones((3, 5)), "b": jnp.ones((3, 7))}
  mask = {"a": jnp.array([True, False, True]), "b": jnp.array([True, True, False])}
  config = {"kind": "gated", "width": 8}
  module = fusion.build_fusion_from_config(config, {"num_classes": 4},
                                           modalities=["b", "a"])
  variables = jax.jit(module.init)(_key(0), feats, mask)
  joint, logits, aux = jax.jit(module.apply)(variables, feats, mask)
  assert joint.shape == (3, 8) and logits.shape == (3, 4)
  assert "loss/gate_entropy" in aux
  # NaN in an absent slot reaches neither the output nor the projections.
  dirty = {"a": feats["a"].at[1].set(jnp.nan), "b": feats["b"].at[2].set(jnp.nan)}
  jax.tree.map(np.testing.assert_array_equal, (joint, logits, aux),
               jax.jit(module.apply)(variables, dirty, mask))

  late = fusion.build_fusion_from_config({"kind": "late"}, {"num_classes": 2})
  same = {"a": feats["a"], "b": feats["b"][:, :5]}
  variables = jax.jit(late.init)(_key(1), same, mask)
  joint, logits, _ = jax.jit(late.apply)(variables, same, mask)
  assert logits.shape == (3, 2)
  np.testing.assert_array_equal(joint, logits)

  no_task = fusion.build_fusion_from_config({"kind": "mean"})
  with pytest.raises(ValueError, match="features of one width"):
    no_task.apply({}, feats, mask)
  assert no_task.apply({}, same, mask)[1] is None
  with pytest.raises(ValueError, match="needs a 'kind'"):
    fusion.build_fusion_from_config({"width": 8})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['experts'\]"):
    fusion.build_fusion_from_config({"kind": "moe", "experts": 2})
  with pytest.raises(ValueError, match=r"task config has no field\(s\) \['classes'\]"):
    fusion.build_fusion_from_config({"kind": "mean"}, {"classes": 2})
  with pytest.raises(ValueError, match="'width' .* needs the modalities"):
    fusion.build_fusion_from_config({"kind": "mean", "width": 4})


def test_unimodal_heads_see_features_before_dropout_and_only_present_rows():
  feats = {"a": jnp.arange(15.0).reshape(3, 5) / 10, "b": jnp.ones((3, 7))}
  mask = {"a": jnp.array([True, False, True]), "b": jnp.array([True, True, False])}
  module = fusion.build_fusion_from_config(
      {"kind": "concat", "width": 8, "modality_dropout": 0.9},
      {"num_classes": 4, "unimodal_weight": 0.5}, modalities=["a", "b"])
  assert module.unimodal_weight == 0.5
  variables = module.init({"params": _key(0), "dropout": _key(1)}, feats, mask)
  _, _, aux = module.apply(variables, feats, mask, train=True, rngs={"dropout": _key(2)})
  heads = variables["params"]
  for m in "ab":   # a linear head on the zero-filled encoder features, dropout or not
    kernel, bias = (heads[f"unimodal_heads_{m}"]["out"][k] for k in ("kernel", "bias"))
    x = np.where(np.asarray(mask[m])[:, None], feats[m], 0)
    np.testing.assert_allclose(aux["unimodal_logits"][m], x @ kernel + bias, rtol=1e-6)
  for bad, match in (({"unimodal_weight": -1}, "finite number >= 0"),
                     ({"unimodal_weight": 1, "kind": "regression"}, "for kind 'classif")):
    with pytest.raises(ValueError, match=match):
      fusion.build_fusion_from_config({"kind": "concat"}, {"num_classes": 4, **bad},
                                      modalities=["a", "b"])
  with pytest.raises(ValueError, match="late fusion's heads are already one per modality"):
    fusion.build_fusion_from_config({"kind": "late"}, {"num_classes": 2, "unimodal_weight": 1},
                                    modalities=["a", "b"])


def test_task_objective_adds_weighted_unimodal_losses_over_present_examples():
  from mmjax.models.model import ModelOutput  # pylint: disable=g-import-not-at-top
  from mmjax.train import objectives  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  labels = jnp.array([0, 1, 2, 1])
  mask = {"a": jnp.array([True, True, False, True]), "b": jnp.array([False, True, True, True])}
  logits = {m: jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for m in ("ab")}
  fused = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

  def ce(x, y):
    x = np.asarray(x, np.float64)
    return np.log(np.exp(x).sum(-1)) - x[np.arange(len(y)), y]

  out = ModelOutput(embeddings={}, features={}, logit_scale=jnp.array(1.0), logits=fused,
                    unimodal_logits=logits, unimodal_weight=0.25)
  loss, metrics = objectives.task_objective(out, {"label": labels, "mask": mask}, {})
  per_modality = {m: ce(logits[m], np.asarray(labels))[np.asarray(mask[m])].mean()
                  for m in "ab"}
  want = ce(fused, np.asarray(labels)).mean() + 0.25 * np.mean(list(per_modality.values()))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for m in "ab":
    np.testing.assert_allclose(metrics[f"task/unimodal/{m}/cross_entropy"], per_modality[m],
                               rtol=1e-5)
    hits = (np.argmax(logits[m], -1) == np.asarray(labels))[np.asarray(mask[m])]
    np.testing.assert_allclose(metrics[f"task/unimodal/{m}/accuracy"], hits.mean())
