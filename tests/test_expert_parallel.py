"""Expert parallelism (`expert_axis`) against the replicated layer on 8 devices.

The reference routes each device's block of the batch with every expert on one
device (a vmap over the blocks, no mesh); the expert-parallel layer runs in a
`shard_map` over a ('data', 'expert') mesh with the expert-stacked params sharded
over 'expert' and tokens exchanged by `all_to_all`. Outputs and gradients must agree.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import fusion
from mmjax.fusion import moe

DEVICES = 8
AXES = ("data", "expert")


def _mesh(data, expert):
  return jax.make_mesh((data, expert), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _inputs(seed, batch, width, names=("a", "b", "c")):
  rng = np.random.default_rng(seed)
  feats = {m: jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
           for m in names}
  mask = {m: jnp.asarray(rng.random(batch) < 0.8) for m in names}
  mask[names[0]] = jnp.ones(batch, bool)  # every sample has one modality
  return feats, mask


def _split(a):
  return a.reshape(DEVICES, -1, *a.shape[1:])


def _objective(joint, aux, target):
  """A scalar that depends on the outputs and on every auxiliary loss."""
  losses = sum(v for k, v in aux.items() if k.startswith("loss/"))
  return jnp.sum(joint * target) + losses


@functools.partial(jax.jit, static_argnums=(0, 1))
def _both_layouts(module, mesh, params, feats, mask, target):
  """(joint, grads, dropped) of the expert-parallel layer and of the reference.

  Reference: each device's block through the layer without expert_axis, all
  experts in one place (a vmap over the blocks). Expert parallel: a shard_map over
  the mesh, the batch split over both axes, expert params sharded over 'expert'.
  """
  plain = module.clone(expert_axis=None)

  def ref_loss(p):
    def block(f, m, t):
      joint, aux = plain.apply({"params": p}, f, m)
      return _objective(joint, aux, t), (joint, aux)
    loss, (joint, aux) = jax.vmap(block)(jax.tree.map(_split, feats),
                                         jax.tree.map(_split, mask), _split(target))
    return jnp.sum(loss), (joint.reshape(-1, joint.shape[-1]), aux)

  def body(p, f, m, t):
    joint, aux = module.apply({"params": p}, f, m)
    return (jax.lax.psum(_objective(joint, aux, t), AXES),
            (joint, jax.tree.map(lambda a: a[None], aux)))

  def ep_loss(p):
    batch = P(AXES)
    return jax.shard_map(body, mesh=mesh,
                         in_specs=(moe.expert_param_specs(p), batch, batch, batch),
                         out_specs=(P(), batch))(p, feats, mask, target)

  (_, (ref_joint, ref_aux)), ref_grads = jax.value_and_grad(ref_loss, has_aux=True)(
      params)
  (_, (ep_joint, ep_aux)), ep_grads = jax.value_and_grad(ep_loss, has_aux=True)(params)
  return (ep_joint, ep_grads, ep_aux), (ref_joint, ref_grads, ref_aux)


CASES = {
    # kind, fields, mesh (data, expert); capacity 1.0 of top-2 drops assignments.
    # 'flexmoe' holds one expert per device (the 1/8 layout of the test below).
    "moe_data2": ("moe", dict(num_experts=8, top_k=2, capacity_factor=1.0,
                              num_layers=1, num_heads=2), (2, 4)),
    "flexmoe": ("flexmoe", dict(num_experts=8, top_k=2, capacity_factor=1.0,
                                noisy_gating=False, num_heads=2), (1, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_equal_the_replicated_layer(name):
  kind, fields, (data, expert) = CASES[name]
  module = fusion.build_fusion(kind, expert_axis="expert", **fields)
  feats, mask = _inputs(0, batch=DEVICES * 4, width=16,
                        names=("a", "b") if kind == "flexmoe" else ("a", "b", "c"))
  params = jax.jit(module.init)(jax.random.key(1), feats, mask)["params"]
  target = jnp.asarray(np.random.default_rng(2).standard_normal((DEVICES * 4, 16)),
                       jnp.float32)
  (ep, g_ep, aux_ep), (ref, g_ref, aux_ref) = _both_layouts(
      module, _mesh(data, expert), params, feats, mask, target)
  np.testing.assert_allclose(ep, ref, atol=1e-5, rtol=1e-5)
  for key in aux_ref:
    np.testing.assert_allclose(np.reshape(aux_ep[key], np.shape(aux_ref[key])),
                               aux_ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ep),
                          jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # every expert got a gradient; capacity per device group dropped some assignments
  # (the same ones on both sides: the outputs agree)
  assert np.all(np.abs(np.asarray(g_ref["moe_0"]["w_in"])).max(axis=(1, 2)) > 0)
  if kind == "moe":
    assert float(np.max(aux_ref["stats/moe_dropped_fraction"])) > 0


def test_per_device_expert_params_are_one_eighth():
  module = fusion.build_fusion("moe", num_experts=8, top_k=2, num_layers=1,
                               num_heads=2, expert_axis="expert")
  feats, mask = _inputs(0, batch=DEVICES, width=16)
  params = jax.jit(module.init)(jax.random.key(0), feats, mask)["params"]
  mesh = _mesh(1, 8)
  sharded = jax.device_put(params, jax.tree.map(
      lambda s: NamedSharding(mesh, s), moe.expert_param_specs(params)))
  expert = sharded["moe_0"]
  for name in ("w_in", "b_in", "w_out", "b_out"):
    full = expert[name]
    shard = full.addressable_shards[0].data
    assert shard.shape == (1,) + full.shape[1:], name
    assert shard.nbytes * DEVICES == full.nbytes
  # the router and everything outside the experts stay whole on every device
  router = expert["router"]["kernel"]
  assert router.addressable_shards[0].data.shape == router.shape


def test_experts_not_divisible_by_the_expert_axis():
  module = fusion.build_fusion("moe", num_experts=6, top_k=2, num_layers=1,
                               num_heads=2, expert_axis="expert")
  feats, mask = _inputs(0, batch=DEVICES, width=8)
  params = jax.eval_shape(module.init, jax.random.key(0), feats, mask)["params"]
  mesh = _mesh(2, 4)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the size 4 "
                                       r"of mesh axis 'expert'"):
    jax.eval_shape(jax.shard_map(
        lambda p, f, m: module.apply({"params": p}, f, m)[0], mesh=mesh,
        in_specs=(P(), P(AXES), P(AXES)), out_specs=P(AXES)), params, feats, mask)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    moe.check_expert_mesh(6, "expert", {"data": 2, "expert": 4})
  with pytest.raises(ValueError, match="expert_axis='expert' is not an axis"):
    moe.check_expert_mesh(8, "expert", {"data": 8})
  moe.check_expert_mesh(8, "expert", {"data": 2, "expert": 4})
