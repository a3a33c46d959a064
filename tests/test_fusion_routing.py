"""Routing math of the MoE layers, the Flex-MoE bank and losses, the AECF gate."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import fusion


def _key(seed):
  # rbg keys: threefry kernels take seconds to compile on small CPU machines.
  return jax.random.key(seed, impl="rbg")


def _np_logsumexp(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def test_top_k_weights_sum_to_one_and_follow_probabilities():
  logits = jax.random.normal(_key(0), (6, 5)) * 2
  index, weights, probs = fusion.top_k_routing(logits, 3)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  expected_index = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  np.testing.assert_array_equal(index, expected_index)
  p = np.exp(logits - _np_logsumexp(np.asarray(logits))[:, None])
  np.testing.assert_allclose(probs, p, rtol=1e-5)
  chosen = np.take_along_axis(p, expected_index, -1)
  np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
  # top-1 keeps the raw probability (Switch), so the router still gets a gradient.
  _, w1, _ = fusion.top_k_routing(logits, 1)
  np.testing.assert_allclose(w1[:, 0], p.max(-1), rtol=1e-5)


def test_top_k_routing_forced_first_choice():
  logits = jnp.array([[3.0, 2.0, 1.0, 0.0]] * 3)
  forced = jnp.array([2, -1, 3])
  index, weights, _ = fusion.top_k_routing(logits, 2, forced_expert=forced)
  np.testing.assert_array_equal(index, [[2, 0], [0, 1], [3, 0]])
  np.testing.assert_allclose(weights[0], np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum(),
                             rtol=1e-6)


def test_expert_capacity_and_bad_config():
  assert fusion.expert_capacity(10, 4, 2, 1.0) == 5
  assert fusion.expert_capacity(10, 4, 1, 0.1) == 1
  assert fusion.expert_capacity(10, 2, 2, 4.0) == 10
  assert fusion.expert_capacity(10, 4, 2, None) == 10
  for factor in (0.0, -0.5):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
      fusion.expert_capacity(10, 4, 2, factor)
  with pytest.raises(ValueError, match="top_k=5 is larger than the number of experts"):
    fusion.expert_capacity(10, 4, 5, 1.0)
  with pytest.raises(ValueError, match="top_k=3 is larger"):
    fusion.top_k_routing(jnp.zeros((2, 2)), 3)
  with pytest.raises(ValueError, match="top_k=3 is larger"):
    fusion.SparseMoE(num_experts=2, top_k=3, mlp_dim=4)


def test_capacity_drops_with_known_routing_top1():
  index = jnp.array([[0], [0], [0], [1], [0]])
  dispatch, combine, kept = fusion.dispatch_and_combine(
      index, jnp.full((5, 1), 0.5), None, num_experts=2, capacity=2)
  np.testing.assert_array_equal(kept[:, 0], [True, True, False, True, False])
  expected = np.zeros((5, 2, 2))
  expected[0, 0, 0] = expected[1, 0, 1] = expected[3, 1, 0] = 1
  np.testing.assert_array_equal(dispatch, expected)
  np.testing.assert_array_equal(combine, 0.5 * expected)


def test_capacity_gives_first_choices_priority_and_skips_invalid_tokens():
  index = jnp.array([[0, 1], [0, 1], [1, 0]])
  weights = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
  dispatch, combine, kept = fusion.dispatch_and_combine(index, weights, None, 2, 2)
  np.testing.assert_array_equal(kept, [[True, True], [True, False], [True, False]])
  assert dispatch[0, 1, 1] == 1 and combine[0, 1, 1] == pytest.approx(0.4)
  assert dispatch.sum() == 4
  # An invalid (absent) token takes no slot: token 1 is skipped, token 2's
  # second choice now fits.
  valid = jnp.array([True, False, True])
  dispatch, _, kept = fusion.dispatch_and_combine(index, weights, valid, 2, 2)
  np.testing.assert_array_equal(kept, [[True, True], [False, False], [True, True]])
  assert dispatch[1].sum() == 0


def test_sparse_moe_dropped_tokens_output_zero():
  num_tokens, width = 8, 4
  x = jnp.abs(jax.random.normal(_key(0), (num_tokens, width))) + 0.1
  layer = fusion.SparseMoE(num_experts=2, top_k=1, mlp_dim=8, capacity_factor=0.5)
  variables = jax.jit(layer.init)(_key(1), x)
  params = jax.tree.map(lambda a: a, variables["params"])
  # Router: every token prefers expert 0; capacity = ceil(0.5 * 8 / 2) = 2.
  params["router"]["kernel"] = jnp.stack([jnp.ones(width), -jnp.ones(width)], axis=1)
  y, routing = jax.jit(layer.apply)({"params": params}, x)
  assert routing["capacity"] == 2
  np.testing.assert_array_equal(y[2:], 0.0)
  assert np.all(np.abs(np.asarray(y[:2])).sum(-1) > 0)
  np.testing.assert_allclose(routing["dropped_fraction"], 6 / 8)
  np.testing.assert_allclose(routing["expert_load"], [1.0, 0.0])
  # The two kept tokens get expert 0's MLP scaled by their router probability.
  p = params
  hidden = jax.nn.gelu(x[:2] @ p["w_in"][0] + p["b_in"][0])
  expected = (hidden @ p["w_out"][0] + p["b_out"][0]) * routing["weights"][:2]
  np.testing.assert_allclose(y[:2], expected, rtol=1e-4, atol=1e-6)


def test_load_balancing_loss_known_routing():
  probs = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
  index = jnp.array([[0], [0], [1], [0]])
  # f = [3/4, 1/4], P = [0.6, 0.4]: 2 * (0.45 + 0.1) = 1.1
  np.testing.assert_allclose(fusion.load_balancing_loss(probs, index), 1.1, rtol=1e-6)
  valid = jnp.array([True, True, True, False])
  # f = [2/3, 1/3], P = [0.5, 0.5]: 2 * 0.5 = 1.0
  np.testing.assert_allclose(fusion.load_balancing_loss(probs, index, valid), 1.0,
                             rtol=1e-6)
  uniform = jnp.full((4, 4), 0.25)
  np.testing.assert_allclose(
      fusion.load_balancing_loss(uniform, jnp.array([[0], [1], [2], [3]])), 1.0)
  collapsed = jnp.tile(jnp.array([[1.0, 0, 0, 0]]), (4, 1))
  np.testing.assert_allclose(
      fusion.load_balancing_loss(collapsed, jnp.zeros((4, 1), jnp.int32)), 4.0)


def test_router_z_loss_matches_formula():
  logits = np.asarray(jax.random.normal(_key(2), (7, 5)) * 3)
  expected = np.mean(_np_logsumexp(logits) ** 2)
  np.testing.assert_allclose(fusion.router_z_loss(jnp.asarray(logits)), expected, rtol=1e-5)
  valid = jnp.array([1, 1, 0, 0, 1, 0, 1], bool)
  expected = np.mean(_np_logsumexp(logits)[np.asarray(valid)] ** 2)
  np.testing.assert_allclose(fusion.router_z_loss(jnp.asarray(logits), valid), expected,
                             rtol=1e-5)


# ----------------------------------------------------------------- Flex-MoE


def test_missing_modality_bank_returns_entry_per_combination_and_modality():
  bank = fusion.MissingModalityBank(num_modalities=3, dim=4)
  combination = jnp.array([1, 2, 5, 7, 6, 3])
  variables = bank.init(_key(0), combination)
  table = variables["params"]["embedding"]
  assert table.shape == (7, 3, 4)
  out = bank.apply(variables, combination)
  for i, c in enumerate(np.asarray(combination)):
    for m in range(3):
      np.testing.assert_array_equal(out[i, m], table[c - 1, m])


@pytest.mark.parametrize("bad", [0, 8, -1])
def test_missing_modality_bank_rejects_unknown_combination(bad):
  bank = fusion.MissingModalityBank(num_modalities=3, dim=4)
  variables = bank.init(_key(0), jnp.array([1]))
  with pytest.raises(ValueError, match=rf"combination index \[{bad}\] is not known"):
    bank.apply(variables, jnp.array([3, bad]))


def test_flexmoe_fills_absent_modalities_from_the_bank():
  rng = np.random.default_rng(0)
  rows = ["abc", "a", "bc", "b", "ac"]
  feats = {m: jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for m in "abc"}
  mask = {m: jnp.array([m in r for r in rows]) for m in "abc"}
  module = fusion.build_fusion("flexmoe", top_k=2)
  variables = jax.jit(module.init)(_key(0), feats, mask)
  apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))
  (_, _), state = apply(variables, feats, mask)
  filled = state["intermediates"]["filled_tokens"][0]
  table = variables["params"]["bank"]["embedding"]
  combination = np.asarray(fusion.combination_index(mask))
  np.testing.assert_array_equal(combination, [7, 1, 6, 2, 5])
  for i, row in enumerate(rows):
    for m, name in enumerate("abc"):
      expected = feats[name][i] if name in row else table[combination[i] - 1, m]
      np.testing.assert_array_equal(filled[i, m], expected)


def test_flexmoe_routes_fewer_modality_samples_to_their_combination_expert():
  layer = fusion.SparseMoE(num_experts=7, top_k=2, mlp_dim=8, capacity_factor=None)
  x = jax.random.normal(_key(0), (6, 4))
  forced = jnp.array([-1, 0, 3, -1, 5, 6])
  variables = jax.jit(layer.init)(_key(1), x, forced_expert=forced)
  _, routing = jax.jit(layer.apply)(variables, x, forced_expert=forced)
  index = np.asarray(routing["expert_index"])
  np.testing.assert_array_equal(index[[1, 2, 4, 5], 0], [0, 3, 5, 6])
  logits = np.asarray(routing["logits"])
  np.testing.assert_array_equal(index[[0, 3]], np.argsort(-logits[[0, 3]], -1)[:, :2])


def test_flexmoe_needs_an_expert_per_combination():
  feats = {m: jnp.ones((2, 4)) for m in "abc"}
  mask = {m: jnp.ones(2, bool) for m in "abc"}
  with pytest.raises(ValueError, match=r"num_experts=3 < 2\*\*3 - 1 = 7"):
    fusion.build_fusion("flexmoe", num_experts=3, top_k=2).init(
        _key(0), feats, mask)
  with pytest.raises(ValueError, match="top_k=8 is larger"):
    fusion.build_fusion("flexmoe", top_k=8).init(_key(0), feats, mask)


def test_flexmoe_losses_against_formulas():
  x = np.array([1.0, 2.0, 3.0, 6.0])
  np.testing.assert_allclose(fusion.cv_squared(jnp.asarray(x)), x.var() / x.mean() ** 2,
                             rtol=1e-6)
  gates = jnp.array([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
  load = (gates > 0).astype(jnp.float32)
  weight = jnp.array([1.0, 1.0, 0.0])
  importance, counts = np.array([0.6, 0.9, 0.5]), np.array([1.0, 2.0, 1.0])
  expected = (importance.var() / importance.mean() ** 2
              + counts.var() / counts.mean() ** 2)
  np.testing.assert_allclose(fusion.importance_load_loss(gates, load, weight), expected,
                             rtol=1e-5)
  logits = np.asarray(jax.random.normal(_key(0), (4, 3)))
  target = np.array([2, 0, 1, 1])
  keep = np.array([True, False, True, True])
  log_p = logits - _np_logsumexp(logits)[:, None]
  expected = -np.mean(log_p[np.arange(4), target][keep])
  np.testing.assert_allclose(
      fusion.specialization_loss(jnp.asarray(logits), jnp.asarray(target),
                                 jnp.asarray(keep)), expected, rtol=1e-5)


def test_smooth_top_k_load_matches_monte_carlo():
  rng = np.random.default_rng(0)
  clean = rng.normal(size=(3, 5))
  std = rng.uniform(0.3, 1.5, size=(3, 5))
  noisy = clean + std * rng.normal(size=(3, 5))
  top_k = 2
  prob = np.asarray(fusion.smooth_top_k_load(jnp.asarray(clean), jnp.asarray(noisy),
                                             jnp.asarray(std), top_k))
  # P(expert e in top-k when only its own noise is redrawn).
  draws = 20000
  for n in range(3):
    for e in range(5):
      others = np.delete(noisy[n], e)
      kth_other = np.sort(others)[::-1][top_k - 1]
      sample = clean[n, e] + std[n, e] * rng.normal(size=draws)
      np.testing.assert_allclose(prob[n, e], np.mean(sample > kth_other), atol=0.015)
  with pytest.raises(ValueError, match="top_k < num_experts"):
    fusion.smooth_top_k_load(jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(std), 5)


def test_warmup_order_sorts_by_present_count():
  np.testing.assert_array_equal(fusion.warmup_order(np.array([1, 3, 2, 3, 1])),
                                [1, 3, 2, 0, 4])


# ----------------------------------------------------------------- gated (AECF)


def test_gate_entropy_against_formula():
  probs = jnp.array([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
  present = jnp.array([[True, True, False], [True, True, True], [True, False, False]])
  entropy, normalized = fusion.gate_entropy(probs, present)
  h1 = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
  np.testing.assert_allclose(entropy, [np.log(2), h1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(normalized, [1.0, h1 / np.log(3), 1.0], rtol=1e-6)


def test_gated_fusion_probabilities_output_and_entropy_loss():
  rng = np.random.default_rng(1)
  rows = ["abc", "a", "bc", "ab"]
  feats = {m: jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for m in "abc"}
  mask = {m: jnp.array([m in r for r in rows]) for m in "abc"}
  module = fusion.build_fusion("gated", entropy_coeff=0.5)
  variables = jax.jit(module.init)(_key(0), feats, mask)
  probs = jax.jit(functools.partial(module.apply, method="gate_probabilities"))(
      variables, feats, mask)
  present = np.asarray(fusion.stack_mask(mask))
  np.testing.assert_array_equal(np.asarray(probs)[~present], 0.0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  joint, aux = jax.jit(module.apply)(variables, feats, mask)
  proj = variables["params"]["projection"]
  x = np.stack([np.asarray(feats[m]) * present[:, i, None] for i, m in enumerate("abc")], 1)
  values = np.einsum("bmd,mdf->bmf", x, proj["kernel"]) + np.asarray(proj["bias"])[None]
  np.testing.assert_allclose(joint, np.einsum("bm,bmf->bf", probs, values), rtol=1e-4,
                             atol=1e-6)
  entropy, normalized = fusion.gate_entropy(probs, jnp.asarray(present))
  coeff = 0.5 * (1 - np.asarray(normalized))
  np.testing.assert_allclose(aux["loss/gate_entropy"], -np.mean(coeff * entropy),
                             rtol=1e-5, atol=1e-7)
  assert coeff[1] == 0.0  # a single present modality has nothing to regularise


curriculum_mask = jax.jit(fusion.entropy_curriculum_mask,
                          static_argnames=("max_rate", "ramp_steps"))


def test_entropy_curriculum_mask_targets_the_dominant_modality():
  batch = 3000
  mask = {m: jnp.ones(batch, bool) for m in "abc"}
  collapsed = jnp.tile(jnp.array([[0.98, 0.01, 0.01]]), (batch, 1))
  uniform = jnp.full((batch, 3), 1 / 3)
  key = _key(0)
  # Ramp: no masking at step 0; a uniform gate is never masked.
  same = curriculum_mask(mask, collapsed, key, step=0, max_rate=1.0,
                                        ramp_steps=10)
  np.testing.assert_array_equal(fusion.stack_mask(same), fusion.stack_mask(mask))
  same = curriculum_mask(mask, uniform, key, step=10, max_rate=1.0,
                                        ramp_steps=10)
  np.testing.assert_array_equal(fusion.stack_mask(same), fusion.stack_mask(mask))
  out = np.asarray(fusion.stack_mask(curriculum_mask(
      mask, collapsed, key, step=5, max_rate=0.4, ramp_steps=10)))
  _, normalized = fusion.gate_entropy(collapsed[:1], jnp.ones((1, 3), bool))
  drop = 0.2 * (1 - float(normalized[0])) * 3 * np.array([0.98, 0.01, 0.01])
  np.testing.assert_allclose(1 - out.mean(0), drop, atol=0.025)
  assert out.any(axis=1).all()


def test_entropy_curriculum_mask_keeps_one_and_checks_shape():
  batch = 2000
  mask = {m: jnp.ones(batch, bool) for m in "ab"}
  probs = jnp.tile(jnp.array([[0.9, 0.1]]), (batch, 1))
  out = np.asarray(fusion.stack_mask(curriculum_mask(
      mask, probs, _key(1), step=1, max_rate=1.0, ramp_steps=1)))
  assert out.any(axis=1).all()
  _, normalized = fusion.gate_entropy(probs[:1], jnp.ones((1, 2), bool))
  drop_a = 1.0 * (1 - float(normalized[0])) * 2 * 0.9
  # 'a' is only kept when not dropped; emptied rows get back 'b', never 'a'.
  np.testing.assert_allclose(out[:, 0].mean(), 1 - drop_a, atol=0.02)
  with pytest.raises(ValueError, match="gate_probs must have the mask's shape"):
    fusion.entropy_curriculum_mask(mask, probs[:, :1], _key(1), step=1)
  with pytest.raises(ValueError, match="max_rate must be in"):
    fusion.entropy_curriculum_mask(mask, probs, _key(1), step=1, max_rate=2.0)
