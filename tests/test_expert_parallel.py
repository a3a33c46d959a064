"""Expert parallelism (`expert_axis`) against the replicated layer on 8 devices.

The reference routes each device's block of the batch with every expert on one
device (a vmap over the blocks, no mesh); the expert-parallel layer runs in a
`shard_map` over a ('data', 'expert') mesh with the expert-stacked params sharded
over 'expert' and tokens exchanged by `all_to_all`. Outputs and gradients must agree;
so must the project's train step on data=2 x expert=4 against data=8.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import config_lib, fusion
from mmjax.data import pipeline
from mmjax.fusion import moe
from mmjax.models import model as model_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib

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
    # One expert per device (the 1/8 layout of the test below); moe on data=2 x
    # expert=4 goes through the train step in the last tests.
    "flexmoe": ("flexmoe", dict(num_experts=8, top_k=2, capacity_factor=1.0,
                                noisy_gating=False, num_heads=2), (1, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_equal_the_replicated_layer(name):
  kind, fields, (data, expert) = CASES[name]
  module = fusion.build_fusion(kind, expert_axis="expert", **fields)
  feats, mask = _inputs(0, batch=DEVICES * 4, width=16, names=("a", "b"))
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
  # every expert got a gradient
  assert np.all(np.abs(np.asarray(g_ref["moe_0"]["w_in"])).max(axis=(1, 2)) > 0)


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


class TinyMoEModel(nn.Module):
  """A dense tower per modality, MoE fusion over them, a task head: the ModelOutput
  fields the task objective reads, at a size that compiles in a blink."""
  num_experts: int = 8

  @nn.compact
  def __call__(self, batch, *, train=False, step=None):
    del step
    features = {m: nn.Dense(16, name=f"{m}_tower")(batch[m]) for m in ("a", "b")}
    joint, aux = moe.MoEFusion(num_experts=self.num_experts, top_k=2,
                               capacity_factor=1.0, num_layers=1, num_heads=2,
                               name="fusion")(features, batch["mask"], train=train)
    return model_lib.ModelOutput(embeddings={}, features=features,
                                 logit_scale=jnp.ones(()), logits=nn.Dense(
                                     3, name="task")(joint), joint=joint, aux=aux)


def test_train_step_on_an_expert_axis_equals_data_parallel():
  """The project's train step: mesh data=2 x expert=4 (expert params sharded by the
  default rule) against data=8 (replicated), two SGD steps (plain SGD: Adam would
  blow up the rounding noise of gradients that are zero in exact arithmetic, such
  as the attention's key bias, into full steps)."""
  model = TinyMoEModel()
  rng = np.random.default_rng(0)
  batches = [{"a": rng.normal(size=(32, 8)).astype(np.float32),
              "b": rng.normal(size=(32, 8)).astype(np.float32),
              "label": rng.integers(0, 3, 32).astype(np.int32),
              "mask": {"a": np.ones(32, bool), "b": rng.random(32) < 0.7}}
             for _ in range(2)]
  objective_config = config_lib.base_config().objective
  objective_config.kind = "task"
  tx = optax.sgd(0.5)
  out = {}
  for name, axes in (("expert", {"data": 2, "expert": 4}), ("data", {"data": 8})):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(axes))
    specs = sharding_lib.param_specs(step_lib.abstract_params(model, batches[0]), mesh)
    state = step_lib.create_train_state(model, tx, batches[0], jax.random.key(0), mesh,
                                        specs)
    train_step = step_lib.make_train_step(model, objectives.get("task"),
                                          objective_config, mesh, specs=specs)
    losses = []
    for i, batch in enumerate(batches):
      state, metrics = train_step(state, pipeline.to_global(batch, mesh),
                                  jax.random.key(i))
      losses.append(float(metrics["loss"]))
    # capacity per device group (4 samples x 2 modalities, C = 2) dropped assignments
    assert float(metrics["stats/moe_dropped_fraction"]) > 0
    out[name] = (specs, state, losses)
  specs, state, losses = out["expert"]
  assert specs["fusion"]["moe_0"]["w_in"] == P("expert")
  assert specs["fusion"]["moe_0"]["router"]["kernel"] == P()
  w_in = state.params["fusion"]["moe_0"]["w_in"]
  assert w_in.addressable_shards[0].data.shape[0] == 8 // 4
  np.testing.assert_allclose(losses, out["data"][2], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                          jax.tree.leaves(out["data"][1].params)):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_unsharded_expert_params_on_an_expert_axis():
  module = fusion.build_fusion("moe", num_experts=8, top_k=2, num_layers=1, num_heads=2)
  feats, mask = _inputs(0, batch=DEVICES, width=8)
  params = jax.eval_shape(module.init, jax.random.key(0), feats, mask)["params"]
  with pytest.raises(ValueError, match=r"moe_0: the expert params hold 8 experts on this "
                                       r"device, but mesh axis 'expert' of size 4"):
    jax.eval_shape(jax.shard_map(
        lambda p, f, m: module.apply({"params": p}, f, m)[0], mesh=_mesh(2, 4),
        in_specs=(P(), P(AXES), P(AXES)), out_specs=P(AXES)), params, feats, mask)
