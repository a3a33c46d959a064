"""Every fusion kind: learns a toy task, ignores absent inputs, stays finite.

One model per kind is trained once (module-scoped fixture) on a synthetic
task: the label is a class prototype per modality plus noise, so every
modality alone carries the label. The other tests reuse its compiled
functions and trained parameters.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import fusion

NAMES = ("a", "b", "c")
NUM_CLASSES, WIDTH = 4, 16
TRAIN_BATCH, EVAL_BATCH, TRAIN_STEPS = 64, 256, 200
NOISE = 2.0
# Cheaper LLVM passes: these programs are tiny, compilation dominates.

CONFIGS = {
    "concat": dict(dropout_rate=0.1),
    "mean": dict(),
    "late": dict(num_classes=NUM_CLASSES),
    "attention": dict(num_layers=1, dropout_rate=0.1),
    "ovo": dict(),
    "moe": dict(num_layers=1, num_experts=4, top_k=2, noisy_gating=True),
    "flexmoe": dict(top_k=2),
    "gated": dict(entropy_coeff=0.1),
}


def _key(seed):
  # rbg keys: threefry kernels take seconds to compile on small CPU machines.
  return jax.random.key(seed, impl="rbg")


PROTOTYPES = jnp.asarray(np.random.default_rng(0).normal(
    size=(len(NAMES), NUM_CLASSES, WIDTH)), jnp.float32)


def make_batch(key, batch, drop_rate):
  """Features dict [B, D] per modality, MCAR mask (>= 1 present), labels [B]."""
  k_label, k_noise, k_mask = jax.random.split(key, 3)
  labels = jax.random.randint(k_label, (batch,), 0, NUM_CLASSES)
  x = PROTOTYPES[:, labels] + NOISE * jax.random.normal(
      k_noise, (len(NAMES), batch, WIDTH))
  features = {name: x[i] for i, name in enumerate(NAMES)}
  full = {name: jnp.ones(batch, bool) for name in NAMES}
  return features, fusion.modality_dropout(full, drop_rate, k_mask), labels


class FusionClassifier(nn.Module):
  """Per-modality encoders, the fusion module, a task head (none for `late`).

  The encoders stand in for the model's per-modality projections to the
  shared width. Their outputs for absent entries are replaced by
  `absent_fill` (0 in training, garbage in the tests), so the fusion module
  itself sees the garbage while no gradient flows into the encoders from it.
  """
  kind: str
  config: tuple

  def setup(self):
    self.encoders = {n: nn.Dense(WIDTH) for n in NAMES}
    self.fusion = fusion.build_fusion(self.kind, **dict(self.config))
    self.head = (None if self.fusion.produces_task_output
                 else fusion.TaskHead(NUM_CLASSES))

  def __call__(self, features, mask, train=False, absent_fill=0.0):
    features = {n: jnp.where(mask[n][:, None], self.encoders[n](x), absent_fill)
                for n, x in features.items()}
    joint, aux = self.fusion(features, mask, train=train)
    logits = joint if self.head is None else self.head(joint, train=train)
    return logits, aux

  def gate_probabilities(self, features, mask):
    features = {n: self.encoders[n](x) for n, x in features.items()}
    return self.fusion.gate_probabilities(features, mask)


def _total_loss(model, params, features, mask, labels, rng, absent_fill):
  logits, aux = model.apply({"params": params}, features, mask, train=True,
                            absent_fill=absent_fill, rngs={"dropout": rng})
  aux_loss = sum(v for k, v in aux.items() if k.startswith("loss/"))
  return fusion.task_loss(logits, labels) + aux_loss


# Shared by every kind (same shapes), so compiled once.
train_batch = jax.jit(lambda key, step: make_batch(
    jax.random.fold_in(key, step), TRAIN_BATCH, 0.4))
eval_batch = jax.jit(lambda key: make_batch(key, EVAL_BATCH, 0.4))


class Trained:
  """A model of one kind trained with optax adam, and its compiled functions.

  `step(params, opt_state, features, mask, labels, rng, step)` is the train
  step (returns new params, opt state, loss and gradients); the tests reuse it
  to check losses and gradients in training mode.
  """

  def __init__(self, kind):
    self.kind = kind
    self.model = model = FusionClassifier(kind, tuple(sorted(CONFIGS[kind].items())))
    data_key = _key(0)
    features, mask, _ = train_batch(data_key, 0)
    params = jax.jit(model.init)(
        {"params": _key(1), "dropout": _key(2)}, features, mask)["params"]
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, features, mask, labels, rng, step, absent_fill):
      k_drop, k_curriculum = jax.random.split(rng)
      if kind == "gated":  # the trainer-side AECF curriculum
        probs = model.apply({"params": params}, features, mask,
                            method="gate_probabilities")
        mask = fusion.entropy_curriculum_mask(mask, probs, k_curriculum, step=step,
                                              max_rate=0.3, ramp_steps=100)
      loss, grads = jax.value_and_grad(functools.partial(_total_loss, model))(
          params, features, mask, labels, k_drop, absent_fill)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = optimizer.init(params)
    rngs = jax.random.split(_key(3), TRAIN_STEPS)
    for i in range(TRAIN_STEPS):
      features, mask, labels = train_batch(data_key, i)
      params, opt_state, _, _ = step(params, opt_state, features, mask, labels,
                                     rngs[i], i, 0.0)
    self.params, self.opt_state, self.step = params, opt_state, step
    predict = jax.jit(lambda p, f, m, fill: model.apply({"params": p}, f, m,
                                                        absent_fill=fill))
    # Always called with `fill` given, so one compilation serves every call.
    self.predict = lambda p, f, m, fill=0.0: predict(p, f, m, fill)
    self.eval_features, self.eval_mask, self.eval_labels = eval_batch(_key(4))
    self.train_features, self.train_mask, self.train_labels = train_batch(
        _key(5), 0)

  def accuracy(self, mask):
    logits, _ = self.predict(self.params, self.eval_features, mask)
    return float(jnp.mean(jnp.argmax(logits, -1) == self.eval_labels))

  def train_step(self, features, mask, absent_fill=0.0):
    return self.step(self.params, self.opt_state, features, mask, self.train_labels,
                     _key(6), TRAIN_STEPS, absent_fill)


@pytest.fixture(scope="module", params=list(CONFIGS))
def trained(request):
  return Trained(request.param)


def _only(name, batch=EVAL_BATCH):
  return {n: jnp.full(batch, n == name) for n in NAMES}


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


def test_learns_above_chance_with_all_and_with_single_modalities(trained):
  chance = 1 / NUM_CLASSES
  full = {n: jnp.ones(EVAL_BATCH, bool) for n in NAMES}
  accuracies = {"all": trained.accuracy(full), "mcar": trained.accuracy(trained.eval_mask)}
  accuracies.update({f"only {n}": trained.accuracy(_only(n)) for n in NAMES})
  assert accuracies["all"] > 0.75, accuracies
  assert accuracies["mcar"] > 0.65, accuracies
  for name in NAMES:
    assert accuracies[f"only {name}"] > 2 * chance, accuracies


@pytest.mark.parametrize("garbage", [1e30, np.nan, -np.inf])
def test_absent_input_cannot_change_output(trained, garbage):
  def soil(features, mask):
    return {n: jnp.where(mask[n][:, None], features[n], garbage) for n in NAMES}

  features, mask = trained.eval_features, trained.eval_mask
  clean = trained.predict(trained.params, features, mask)
  _assert_trees_equal(clean, trained.predict(trained.params, soil(features, mask), mask,
                                             garbage))
  # Training mode (same dropout / router-noise rng): loss, gradients, update.
  features, mask = trained.train_features, trained.train_mask
  dirty = trained.train_step(features, mask, garbage)
  _assert_trees_equal(trained.train_step(features, mask), dirty)
  _assert_finite(dirty)


def test_no_nan_with_a_single_present_modality(trained):
  for batch, features, train in ((EVAL_BATCH, trained.eval_features, False),
                                 (TRAIN_BATCH, trained.train_features, True)):
    rows = np.arange(batch) % len(NAMES)  # each sample keeps one modality
    one_each = {n: jnp.asarray(rows == i) for i, n in enumerate(NAMES)}
    for mask in (one_each, _only("b", batch)):
      if train:
        _assert_finite(trained.train_step(features, mask))
      else:
        _assert_finite(trained.predict(trained.params, features, mask))


def test_sample_without_modality_stays_finite_under_jit(trained):
  # Values are not checked under jit (check_mask is the pipeline's job);
  # the module must still not produce NaN.
  mask = {n: trained.eval_mask[n].at[0].set(False) for n in NAMES}
  _assert_finite(trained.predict(trained.params, trained.eval_features, mask))


def test_bad_masks_raise_clear_errors(trained):
  module = fusion.build_fusion(trained.kind, **CONFIGS[trained.kind])
  variables = {"params": trained.params.get("fusion", {})}
  features, mask = trained.eval_features, trained.eval_mask
  apply = module.apply
  with pytest.raises(ValueError, match=r"mask lacks modality \['c'\]"):
    apply(variables, features, {n: mask[n] for n in ("a", "b")})
  with pytest.raises(ValueError, match=r"features lack modality \['c'\]"):
    apply(variables, {n: features[n] for n in ("a", "b")}, mask)
  empty = {n: mask[n].at[3].set(False) for n in NAMES}
  with pytest.raises(ValueError, match=r"no modality present \(batch rows \[3\]"):
    apply(variables, features, empty)


def test_per_device_batches_under_shard_map_match_one_device(trained, mesh8):
  if trained.kind != "flexmoe":
    return  # one kind is enough to show the per-device use; flexmoe has the most state
  model = trained.model

  def per_device(params, features, mask):
    return model.apply({"params": params}, features, mask)[0]

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                                  in_specs=(P(), P("data"), P("data")),
                                  out_specs=P("data")))
  expected, _ = trained.predict(trained.params, trained.eval_features, trained.eval_mask)
  np.testing.assert_allclose(
      sharded(trained.params, trained.eval_features, trained.eval_mask), expected,
      rtol=1e-5, atol=1e-5)
