"""Fusion end to end: the fusion configs train through the trainer and log the
robustness evaluation; the `task` objective, modality dropout and the gated
curriculum against direct computations; bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import experiment
from mmjax import config_lib, fusion, models
from mmjax.data import missing as missing_lib
from mmjax.data import pipeline
from mmjax.data import world as world_lib
from mmjax.data import world_info
from mmjax.evals.evaluators import robustness
from mmjax.models.model import ModelOutput
from mmjax.train import objectives, trainer
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("concat", "moe", "flexmoe", "gated")
COMBINATIONS = ("audio", "image", "text", "audio+image", "audio+text", "image+text",
                "audio+image+text")
RATES = ("0", "0.1", "0.3", "0.5", "0.7")


@pytest.fixture(autouse=True)
def rbg_keys():
  """rbg keys in this module: threefry's random-number kernels (one per parameter
  initialiser) take most of the compile time of these small models on CPU."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


def load_config(name, arg=None):
  return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)


@pytest.mark.parametrize("method", METHODS)
def test_runlocal_config_trains_and_logs_robustness(method, tmp_path):
  config = load_config(f"fusion_{method}", "runlocal")
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"])
  assert 0.0 <= metrics["train/task/accuracy"] <= 1.0
  prefix = "eval/robustness/"
  assert metrics[prefix + "chance"] == pytest.approx(1 / 90)
  for condition in COMBINATIONS + tuple(f"missing_{r}" for r in RATES):
    assert 0.0 <= metrics[f"{prefix}{condition}/accuracy"] <= 1.0, condition
    assert 0.0 <= metrics[f"{prefix}{condition}/ece"] <= 1.0, condition
  # The oracle's accuracy falls as modalities go missing, 1 with all of them.
  assert metrics[prefix + "audio+image+text/ceiling"] == 1.0
  assert metrics[prefix + "missing_0/ceiling"] == 1.0
  assert metrics[prefix + "audio/ceiling"] == pytest.approx(1 / 30)
  assert metrics[prefix + "missing_0.7/ceiling"] < metrics[prefix + "missing_0.3/ceiling"] < 1
  # The auxiliary losses of the fusion module reach the objective and the logs.
  aux = {"moe": "train/loss/moe_balance", "flexmoe": "train/loss/flexmoe_specialization",
         "gated": "train/loss/gate_entropy"}.get(method)
  if aux:
    assert np.isfinite(metrics[aux])
  with open(tmp_path / "metrics.jsonl") as f:
    logged = {k for line in f for k in json.loads(line)}
  assert prefix + "image+text/accuracy" in logged
  assert os.path.getsize(tmp_path / "plots" / "robustness_heatmap.png") > 0
  summary = (tmp_path / "summary.md").read_text()
  assert "## Robustness to missing modalities (robustness)" in summary
  assert "| audio+image+text | " in summary and "| missing rate 0.5 |" in summary


def test_robustness_metrics_equal_a_direct_computation(mesh8):
  # The concat runlocal model on a 3-class label (size, which audio expresses), with
  # random parameters; 40 test examples, so the last batch of 16 is padded.
  config = load_config("fusion_concat", "runlocal")
  config.data.label.factors = ("size",)
  config.model.task.num_classes = 3
  config.data.sizes.test = 40
  model = models.build(config.model)
  featurize = experiment.make_featurize(config)
  source = world_lib.World(world_lib.WorldSpec.from_config(config.data), "test")
  init = jax.jit(lambda key: model.init({"params": key, "dropout": key},
                                        experiment.sample_batch(source, featurize, 2)))
  params = init(jax.random.key(0))["params"]
  apply_fn = step_lib.make_apply_fn(model)
  ctx = experiment.eval_context(config, workdir="unused", mesh=mesh8, featurize=featurize,
                                step=0, predict=lambda batch: apply_fn(params, batch))
  metrics = robustness.evaluate_robustness(ctx, split="test", batch_size=16, rates=(0.5,))

  # Directly: zero-fill and mask by hand, run the model on 48 rows (8 of padding).
  clean = [featurize((i, source[i])) for i in range(40)]
  clean += clean[-1:] * 8
  batch = jax.tree.map(lambda *xs: np.stack(xs), *clean)
  labels = batch["label"][:40]
  names = ("audio", "image", "text")
  mcar = missing_lib.Missingness(names, kind="mcar", rates={m: 0.5 for m in names})
  conditions = {c: [set(c.split("+"))] * 48 for c in COMBINATIONS}
  conditions["missing_0.5"] = [{m for m, p in mcar.present(i, ex).items() if p}
                               for i, ex in enumerate(clean)]
  seen_accuracies = set()
  for name, present in conditions.items():
    masked = dict(batch, mask={})
    for m in names:
      here = np.array([m in p for p in present])
      masked["mask"][m] = here
      masked[m] = np.where(here.reshape((-1,) + (1,) * (batch[m].ndim - 1)), batch[m], 0)
    logits = np.concatenate([
        np.asarray(apply_fn(params, pipeline.to_global(
            jax.tree.map(lambda x: x[i:i + 16], masked), mesh8)).logits)
        for i in range(0, 48, 16)])[:40].astype(np.float64)
    accuracy = np.mean(np.argmax(logits, 1) == labels)
    assert metrics[f"{name}/accuracy"] == pytest.approx(accuracy, abs=1e-9), name
    # ECE from its definition: |accuracy - confidence| per bin, weighted by bin size.
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    confidence, correct = probs.max(1), np.argmax(probs, 1) == labels
    bins = np.minimum((np.ceil(confidence * 15) - 1).clip(0), 14).astype(int)
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.sum(bins == b)
              for b in set(bins.tolist())) / len(labels)
    assert metrics[f"{name}/ece"] == pytest.approx(ece, abs=1e-6), name
    seen_accuracies.add(round(accuracy, 6))
  assert len(seen_accuracies) > 1     # the conditions really differ
  assert metrics["chance"] == pytest.approx(1 / 3)
  assert metrics["audio/ceiling"] == 1.0 and metrics["image+text/ceiling"] == pytest.approx(1 / 3)


def _brute_force_oracle(spec, present):
  """Enumerates every factor value: mean over known values of the most likely label."""
  known = set()
  for m in present:
    known |= set(spec.expresses.get(m, ()))
  values = [range(len(world_lib.FACTORS[f])) for f in world_lib.FACTOR_NAMES]
  groups = {}
  for combo in np.array(np.meshgrid(*values, indexing="ij")).reshape(4, -1).T:
    factors = dict(zip(world_lib.FACTOR_NAMES, combo.tolist()))
    key = tuple(factors[f] for f in world_lib.FACTOR_NAMES if f in known)
    groups.setdefault(key, []).append(spec.label_of(factors))
  total = sum(len(g) for g in groups.values())
  return sum(np.bincount(g).max() for g in groups.values()) / total


@pytest.mark.parametrize("mode, num_classes", [("product", 0), ("sum_mod", 4), ("sum_mod", 7)])
def test_world_oracle_accuracy_matches_enumeration(mode, num_classes):
  spec = world_lib.WorldSpec(
      expresses={"image": ("colour",), "audio": ("size", "position"), "text": ("shape",)},
      label_factors=("shape", "colour", "size"), label_mode=mode,
      label_num_classes=num_classes)
  for subset in missing_lib.all_combinations(("audio", "image", "text")):
    assert world_info.oracle_accuracy(spec, subset) == pytest.approx(
        _brute_force_oracle(spec, subset)), subset
  assert world_info.chance(spec) == pytest.approx(_brute_force_oracle(spec, ()))


def test_task_objective_is_the_global_cross_entropy_plus_aux(mesh8):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 16).astype(np.int32)
  aux_local = rng.uniform(size=8).astype(np.float32)   # one value per device

  def per_device(logits, labels, aux):
    out = ModelOutput(embeddings={}, features={}, logit_scale=jnp.ones(()), logits=logits,
                      aux={"loss/extra": aux[0], "stats/thing": aux[0],
                           "stats/vector": jnp.ones(3)})
    loss, metrics = objectives.get("task")(out, {"label": labels}, None, axis_name="data")
    return loss, metrics

  loss, metrics = jax.jit(jax.shard_map(per_device, mesh=mesh8, in_specs=P("data"),
                                        out_specs=P()))(logits, labels, aux_local)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ce = -np.mean(log_p[np.arange(16), labels])
  assert float(metrics["task/cross_entropy"]) == pytest.approx(ce, rel=1e-5)
  assert float(loss) == pytest.approx(ce + aux_local.mean(), rel=1e-5)
  assert float(metrics["task/accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert float(metrics["stats/thing"]) == pytest.approx(aux_local.mean(), rel=1e-6)
  assert "stats/vector" not in metrics


def test_modality_dropout_and_gated_curriculum_mask_inputs_in_training_only():
  names = ("a", "b", "c")
  rng = np.random.default_rng(1)
  features = {m: jnp.asarray(rng.normal(size=(64, 8)), jnp.float32) for m in names}
  mask = {m: jnp.ones(64, bool) for m in names}
  # Modality dropout: a training row is the mean over a subset; eval is untouched.
  module = fusion.build_fusion_from_config({"kind": "mean", "modality_dropout": 0.5},
                                           modalities=names)
  train_joint, _, _ = jax.jit(lambda f, m, k: module.apply(
      {}, f, m, train=True, rngs={"dropout": k}))(features, mask, jax.random.key(0))
  eval_joint, _, _ = jax.jit(lambda f, m: module.apply({}, f, m))(features, mask)
  stacked = np.stack([features[m] for m in names], 1)
  np.testing.assert_allclose(eval_joint, stacked.mean(1), rtol=1e-5, atol=1e-6)
  subsets = [np.array(s, bool) for s in np.ndindex(2, 2, 2) if any(s)]
  candidates = np.stack([stacked[:, s].mean(1) for s in subsets], 1)   # [B, 7, D]
  errors = np.abs(candidates - np.asarray(train_joint)[:, None]).max(-1)
  assert np.all(errors.min(1) < 1e-5)          # every row is the mean of some subset
  dropped = np.abs(np.asarray(train_joint) - np.asarray(eval_joint)).max(1) > 1e-5
  assert 0.6 < dropped.mean() < 1.0   # P(a row loses a modality) = 1 - 0.5^3 = 0.875

  # Gated curriculum: a gate collapsed on 'a' gets 'a' masked in every training row.
  gated = fusion.GatedFusion(curriculum_rate=1.0, modalities=names)
  params = jax.jit(gated.init)(jax.random.key(0), features, mask)["params"]
  params["gate"]["logits"]["kernel"] = jnp.zeros_like(params["gate"]["logits"]["kernel"])
  params["gate"]["logits"]["bias"] = jnp.array([20.0, 0.0, 0.0])
  apply = jax.jit(lambda p, m, train, k: gated.apply(
      {"params": p}, features, m, train=train, rngs={"dropout": k}), static_argnums=2)
  joint, aux = apply(params, mask, True, jax.random.key(1))
  without_a = dict(mask, a=jnp.zeros(64, bool))
  expected, _ = apply(params, without_a, False, jax.random.key(1))
  np.testing.assert_allclose(joint, expected, rtol=1e-5, atol=1e-6)
  assert float(aux["stats/curriculum_masked"]) == pytest.approx(1.0)
  plain, _ = apply(params, mask, False, jax.random.key(1))
  assert not np.allclose(plain, expected)


def test_bad_input_errors_clearly(tmp_path):
  config = load_config("fusion_concat", "runlocal")
  # Unknown fusion kind.
  bad = load_config("fusion_concat", "runlocal")
  bad.model.fusion.kind = "sum"
  with pytest.raises(ValueError, match="unknown fusion kind 'sum'"):
    models.build(bad.model)
  # Fusion on a modality the model lacks.
  bad = load_config("fusion_concat", "runlocal")
  bad.model.fusion.modalities = ("audio", "depth", "image")
  with pytest.raises(ValueError, match=r"the model has no encoder for \['depth'\]"):
    models.build(bad.model)
  # Task classes that do not match the world's label.
  bad = load_config("fusion_concat", "runlocal")
  bad.model.task.num_classes = 10
  with pytest.raises(ValueError, match="model.task.num_classes=10.*90 classes"):
    trainer.train_and_evaluate(bad, str(tmp_path))
  # A batch without labels.
  out = ModelOutput(embeddings={}, features={}, logit_scale=jnp.ones(()),
                    logits=jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
    objectives.get("task")(out, {"image": jnp.zeros((4, 2))}, config.objective)
  # A model without a task head.
  headless = load_config("fusion_concat", "runlocal").model
  headless.task = None
  with pytest.raises(ValueError, match="needs task logits"):
    objectives.build(config.objective, headless)
  # Evaluator and config fields.
  with pytest.raises(ValueError, match=r"modality_dropout must be in \[0, 1\)"):
    fusion.build_fusion_from_config({"kind": "mean", "modality_dropout": 1.0})
  with pytest.raises(ValueError, match="curriculum_rate must be in"):
    fusion.GatedFusion(curriculum_rate=1.5)
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['fast'\]"):
    load_config("fusion_gated", "runlocal,fast")
  with pytest.raises(ValueError, match="rates must be in"):
    robustness.evaluate_robustness(None, split="test", batch_size=8, rates=(1.0,))
