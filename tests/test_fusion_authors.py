"""Flex-MoE and AECF as their authors' code trains them: Flex-MoE's `s_router='code'`
routing and losses, the gated fusion's scheduled entropy coefficient and masking."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import fusion


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _inputs(rows, names, width=4, seed=0):
  rng = np.random.default_rng(seed)
  feats = {m: jnp.asarray(rng.normal(size=(len(rows), width)), jnp.float32) for m in names}
  mask = {m: jnp.array([m in r for r in rows]) for m in names}
  return feats, mask


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _cv2_unbiased(x):
  return np.var(x, ddof=1) / (np.mean(x) ** 2 + 1e-10)


# ------------------------------------------------------------- Flex-MoE, 'code'


def test_flexmoe_code_routing_against_a_direct_computation():
  rows, names = ["ab", "a", "b", "ab", "a", "b"], "ab"
  feats, mask = _inputs(rows, names)
  module = fusion.build_fusion("flexmoe", top_k=2, s_router="code")  # E = 3
  variables = jax.jit(module.init)(_key(0), feats, mask)
  apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]),
                  static_argnames="train")
  (_, aux), state = apply(variables, feats, mask, train=True,
                          rngs={"dropout": _key(1)})
  r = jax.tree.map(np.asarray, state["intermediates"]["routing_0"][0])
  noisy, clean = r["routing_logits"], r["logits"]
  assert not np.allclose(noisy, clean)        # router noise in training
  # No forced expert: every token (fewer-modality ones too) takes the top-k of the
  # noisy logits, weighted by their renormalised softmax.
  np.testing.assert_array_equal(r["expert_index"], np.argsort(-noisy, -1)[:, :2])
  p = np.exp(_np_log_softmax(noisy))
  top = np.take_along_axis(p, r["expert_index"], -1)
  gates = np.zeros_like(p)
  np.put_along_axis(gates, r["expert_index"], top / top.sum(-1, keepdims=True), -1)
  np.testing.assert_allclose(r["gates"], gates, rtol=1e-5, atol=1e-7)

  combination = np.asarray(fusion.combination_index(mask))        # [3, 1, 2, 3, 1, 2]
  full = combination == 3
  balance = special = 0.0
  for m in range(2):     # tokens are sample-major: token b * 2 + m
    g, load, z = r["gates"][m::2], r["load"][m::2], noisy[m::2]
    balance += (_cv2_unbiased(g[full].sum(0)) + _cv2_unbiased(load[full].sum(0))
                # the second loss: missing-modality tokens, every expert but the
                # full combination's (expert 2)
                + _cv2_unbiased(g[~full][:, :2].sum(0))
                + _cv2_unbiased(load[~full][:, :2].sum(0)))
    special += -np.mean(_np_log_softmax(z)[~full, combination[~full] - 1])
  np.testing.assert_allclose(aux["stats/flexmoe_balance"], balance, rtol=1e-4)
  np.testing.assert_allclose(aux["stats/flexmoe_specialization"], special, rtol=1e-5)
  np.testing.assert_allclose(aux["loss/flexmoe_balance"], 0.01 * balance, rtol=1e-4)

  # Inference: clean logits, plain top-k.
  (_, _), state = apply(variables, feats, mask, train=False)
  r = jax.tree.map(np.asarray, state["intermediates"]["routing_0"][0])
  np.testing.assert_array_equal(r["routing_logits"], r["logits"])
  np.testing.assert_array_equal(r["expert_index"], np.argsort(-r["logits"], -1)[:, :2])


def test_flexmoe_code_loss_two_sees_only_missing_modality_tokens():
  gates = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 3)), jnp.float32)
  target = jnp.array([2, 2, 0, 0, 1, 1, 2, 2])
  full = jnp.array([True, True, False, False, False, False, True, True])
  logits = jnp.zeros((8, 3))
  base, _ = fusion.code_router_losses(gates, gates, logits, target, full, 2, 2)
  # Changing the full-combination expert's column on missing-modality tokens
  # changes neither loss term that reads them.
  changed = gates.at[2:6, 2].set(5.0)
  same, _ = fusion.code_router_losses(changed, changed, logits, target, full, 2, 2)
  np.testing.assert_allclose(same, base, rtol=1e-6)
  moved = gates.at[2:6, 0].set(5.0)
  other, _ = fusion.code_router_losses(moved, moved, logits, target, full, 2, 2)
  assert abs(float(other) - float(base)) > 1e-3


def test_flexmoe_paper_routing_still_forces_the_combination_expert():
  rows, names = ["ab", "a", "b"], "ab"
  feats, mask = _inputs(rows, names)
  module = fusion.build_fusion("flexmoe", top_k=2, s_router="paper")
  variables = jax.jit(module.init)(_key(0), feats, mask)
  (_, _), state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
      variables, feats, mask)
  index = np.asarray(state["intermediates"]["routing_0"][0]["expert_index"])
  np.testing.assert_array_equal(index[2:4, 0], [0, 0])    # sample 'a': expert 1 - 1
  np.testing.assert_array_equal(index[4:6, 0], [1, 1])    # sample 'b': expert 2 - 1


def test_flexmoe_unknown_s_router_is_an_error():
  with pytest.raises(ValueError, match=r"flexmoe s_router must be one of \['paper', "
                     r"'code'\] .*got 'authors'"):
    fusion.build_fusion("flexmoe", s_router="authors")


# ------------------------------------------------------------------ AECF, gated


AECF = {"shape": "aecf", "value": 0.05, "free_steps": 10, "ramp_steps": 60,
        "total_steps": 600, "decay_fraction": 0.1}


def _lambda(t):
  """The authors' `_lambda_dyn` with epochs replaced by steps."""
  if t < 10:
    return 0.0
  lam = 0.05 * min(1.0, (t - 10) / 60)
  if t >= 540:
    lam *= 0.5 * (1 + math.cos(math.pi * (t - 540) / 60))
  return lam


@pytest.mark.parametrize("per_instance", [False, True])
def test_gated_entropy_coefficient_follows_the_schedule(per_instance):
  rows, names = ["abc", "ab", "abc", "c"], "abc"
  feats, mask = _inputs(rows, names, width=6, seed=1)
  module = fusion.build_fusion("gated", entropy_coeff=AECF,
                               entropy_per_instance=per_instance)
  variables = jax.jit(module.init)(_key(0), feats, mask)
  apply = jax.jit(module.apply)
  probs = module.apply(variables, feats, mask, method="gate_probabilities")
  entropy, normalized = map(np.asarray, fusion.gate_entropy(
      probs, fusion.stack_mask(mask)))
  for t in (0, 9, 40, 70, 300, 560, 599):
    _, aux = apply(variables, feats, mask, step=jnp.int32(t))
    coeff = _lambda(t) * ((1 - normalized) if per_instance else np.ones(4))
    np.testing.assert_allclose(aux["loss/gate_entropy"], -np.mean(coeff * entropy),
                               rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(aux["stats/gate_entropy_schedule"], _lambda(t),
                               rtol=1e-5, atol=1e-9)
  _, aux = apply(variables, feats, mask)          # no step: the final value, 0
  np.testing.assert_allclose(aux["loss/gate_entropy"], 0.0, atol=1e-9)


def test_gated_masking_ramp_pi_t():
  batch, names = 4000, "abc"
  feats, mask = _inputs(["abc"] * batch, names, width=4)
  ramp = {"shape": "linear", "init": 0.0, "end": 0.4, "steps": 100}
  module = fusion.build_fusion("gated", mask_rate=ramp)
  variables = jax.jit(module.init)(_key(0), feats, mask)
  apply = jax.jit(functools.partial(module.apply, train=True))
  for t, pi in ((0, 0.0), (50, 0.2), (100, 0.4), (400, 0.4)):
    _, aux = apply(variables, feats, mask, step=jnp.int32(t), rngs={"dropout": _key(t)})
    np.testing.assert_allclose(aux["stats/mask_rate"], 0.4 * min(1, t / 100), rtol=1e-6)
    # Each modality is dropped with pi_t; a sample that lost all three gets one back
    # (uniformly): E[removed per sample] = 3 pi - pi^3.
    np.testing.assert_allclose(aux["stats/mask_masked"], 3 * pi - pi ** 3, atol=0.04)


def test_gated_schedules_through_the_model_wrapper():
  rows, names = ["abc", "ab"], "abc"
  feats, mask = _inputs(rows, names, width=4)
  config = ml_collections.ConfigDict({
      "kind": "gated", "entropy_per_instance": False,
      "entropy_coeff": ml_collections.ConfigDict(AECF)})
  module = fusion.build_fusion_from_config(config, {"num_classes": 3},
                                           modalities=tuple(names))
  variables = jax.jit(module.init)(_key(0), feats, mask)
  _, _, aux = jax.jit(module.apply)(variables, feats, mask, step=jnp.int32(40))
  np.testing.assert_allclose(aux["stats/gate_entropy_schedule"], _lambda(40), rtol=1e-5)


def test_gated_bad_schedules_are_errors():
  with pytest.raises(ValueError, match=r"gated entropy_coeff: unknown schedule shape "
                     r"'step'; valid shapes: \['aecf', 'constant', 'linear', "
                     r"'warmup_cosine'\]"):
    fusion.build_fusion("gated", entropy_coeff={"shape": "step", "value": 1.0})
  with pytest.raises(ValueError, match=r"gated mask_rate must be in \[0, 1\) \(or a "
                     r"schedule\), got 1.0"):
    fusion.build_fusion("gated", mask_rate=1.0)
  with pytest.raises(ValueError, match=r"gated entropy_coeff must be >= 0"):
    fusion.build_fusion("gated", entropy_coeff=-0.1)
  with pytest.raises(ValueError, match=r"schedule shape 'linear' needs field\(s\) "
                     r"\['steps'\]"):
    fusion.build_fusion("gated", mask_rate={"shape": "linear", "init": 0, "end": 0.3})
