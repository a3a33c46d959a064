"""FSDP: the sharding rule, data=8 against fsdp=8 step for step, sharded checkpoints
restored across meshes, and the errors of bad layouts."""

import os

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import config_lib, experiment
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives
from mmjax.train import optimizer as opt_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib
from test_grad_cache import TinyModel, _batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _mesh(**axes):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(axes))


def _shapes(**shapes):
  """A params-like tree of shape structs from 'a/b=shape' keywords ('__' for '/')."""
  tree = {}
  for name, shape in shapes.items():
    node = tree
    *path, last = name.split("__")
    for p in path:
      node = node.setdefault(p, {})
    node[last] = jax.ShapeDtypeStruct(shape, np.float32)
  return tree


def test_fsdp_rule_on_a_zoo_of_shapes():
  n = 8
  assert sharding_lib.fsdp_spec((768, 3072), n, 1024) == P(None, "fsdp")     # largest
  assert sharding_lib.fsdp_spec((3072, 768), n, 1024) == P("fsdp")
  assert sharding_lib.fsdp_spec((512, 512), n, 1024) == P(None, "fsdp")      # tie: later
  assert sharding_lib.fsdp_spec((1000, 7, 64), n, 1024) == P("fsdp")         # 1000 = 8 x 125
  assert sharding_lib.fsdp_spec((1001, 7, 64), n, 1024) == P(None, None, "fsdp")
  assert sharding_lib.fsdp_spec((3, 3, 5, 7), n, 10) == P()                  # none divides
  assert sharding_lib.fsdp_spec((768,), n, 1024) == P()                      # small
  assert sharding_lib.fsdp_spec((), n, 0) == P()                             # a scalar
  assert sharding_lib.fsdp_spec((4, 4096), n, 1024) == P(None, "fsdp")       # 4 < 8
  assert sharding_lib.fsdp_spec((768, 3072), 1, 0) == P()                    # no fsdp axis
  assert sharding_lib.fsdp_spec((16, 64), n, 1024) == P(None, "fsdp")        # at the size


def test_rules_first_match_then_module_defaults_then_fsdp(monkeypatch):
  mesh = _mesh(data=1, fsdp=4, expert=2)
  params = _shapes(tower__mlp__kernel=(64, 256), tower__mlp__bias=(256,),
                   tower__attn__kernel=(64, 64), moe__experts__kernel=(4, 64, 128),
                   logit_scale=())
  monkeypatch.setattr(sharding_lib, "DEFAULT_RULES",
                      (("moe/experts", ("expert",)), ("nowhere", ("fsdp",))))
  specs = sharding_lib.param_specs(params, mesh, ((r"tower/attn", ()),), fsdp_min_size=1024)
  assert specs["tower"]["attn"]["kernel"] == P()             # the config's rule
  assert specs["moe"]["experts"]["kernel"] == P("expert")    # the module's default
  assert specs["tower"]["mlp"]["kernel"] == P(None, "fsdp")  # the fsdp rule
  assert specs["tower"]["mlp"]["bias"] == P()                # small
  assert specs["logit_scale"] == P()
  # A default rule naming an axis the mesh lacks holds with that axis dropped.
  specs = sharding_lib.param_specs(params, _mesh(data=2, fsdp=4), fsdp_min_size=1024)
  assert specs["moe"]["experts"]["kernel"] == P(None)


@pytest.mark.parametrize("rules,message", [
    (((r"towr/.*", ()),), r"sharding.rules\[0\]: pattern 'towr/.*' takes no parameter.*"
                           r"named like tower/mlp"),
    (((r"tower/mlp/kernel", (None, None, "fsdp")),), r"spec .* has 3 entries, but "
                                                      r"parameter 'tower/mlp/kernel' has"),
    (((r"tower/mlp/kernel", ("fsdp",)),), r"parameter 'tower/mlp/kernel' of shape \(6, 256\)"
                                          r" cannot be sharded as \('fsdp',\).*dimension 0 "
                                          r"\(6\) is not divisible by 4 \(fsdp=4\)"),
    (((r"tower", ("data",)),), r"not sharded over 'data'"),
    (((r"tower", ("model",)),), r"mesh axis 'model' is not in the mesh \(data=2 x fsdp=4\)"),
    (((r"tower", "fsdp"),), r"the spec must be a tuple"),
    ((r"tower",), r"must be a pair \(pattern, spec\)"),
])
def test_bad_rules(rules, message):
  params = _shapes(tower__mlp__kernel=(6, 256), tower__mlp__bias=(256,))
  with pytest.raises(ValueError, match=message):
    sharding_lib.param_specs(params, _mesh(data=2, fsdp=4), rules)


def test_batch_not_divisible_by_data_times_fsdp():
  c = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  c.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size 12 is not divisible by the 8 devices.*"
                                       r"split over every mesh axis: data=2 x fsdp=4"):
    experiment.check_config(c, _mesh(data=2, fsdp=4))
  with pytest.raises(ValueError, match=r"not divisible by the 8 devices of the mesh "
                                       r"\(data=1 x fsdp=8 x expert=1\)"):
    pipeline.to_global({"x": np.zeros((12, 2))}, _mesh(data=1, fsdp=8, expert=1))


@pytest.fixture(scope="module")
def runs():
  """A small two-tower CLIP model trained STEPS steps on data=8 and on fsdp=8 (every
  array the axis divides sharded), sums in device order. (The default experiment's
  towers: configs/default.py:fsdp, benchmarks/bench_fsdp.py and the launcher tests.)"""
  model = TinyModel(("a", "b"))
  c = config_lib.base_config()
  batches = [_batch(("a", "b"), rows=32, seed=i) for i in range(STEPS)]
  sample = jax.tree.map(lambda x: x[:2], batches[0])
  tx = opt_lib.make_optimizer(c.optimizer, 10)
  out = {"model": model, "tx": tx, "sample": sample}
  for name, axes in (("data", {"data": 8}), ("fsdp", {"data": 1, "fsdp": 8})):
    mesh = _mesh(**axes)
    specs = sharding_lib.param_specs(step_lib.abstract_params(model, sample), mesh,
                                     fsdp_min_size=0)
    state = step_lib.create_train_state(model, tx, sample, jax.random.key(0), mesh, specs)
    initial = jax.device_get(state.params)
    train_step = step_lib.make_train_step(model, objectives.get("clip"), c.objective, mesh,
                                          deterministic_reductions=True, specs=specs)
    losses = []
    for i, batch in enumerate(batches):
      state, metrics = train_step(state, pipeline.to_global(batch, mesh), jax.random.key(i))
      losses.append(float(metrics["loss"]))
    out[name] = dict(mesh=mesh, specs=specs, state=state, losses=losses, initial=initial)
  return out


def test_fsdp_equals_data_parallel_step_for_step(runs):
  data, fsdp = runs["data"], runs["fsdp"]
  np.testing.assert_allclose(fsdp["losses"], data["losses"], rtol=0, atol=1e-6)
  for a, b, start in zip(jax.tree.leaves(jax.device_get(fsdp["state"].params)),
                         jax.tree.leaves(jax.device_get(data["state"].params)),
                         jax.tree.leaves(data["initial"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # Training moved the params (a few steps of warmup are not a no-op).
  moved = [float(np.abs(b - s).max()) for b, s in zip(
      jax.tree.leaves(jax.device_get(data["state"].params)), jax.tree.leaves(data["initial"]))]
  assert max(moved) > 1e-6


def test_fsdp_shards_params_and_optimizer_state(runs):
  fsdp, data = runs["fsdp"], runs["data"]
  state = fsdp["state"]
  specs = jax.tree.leaves(fsdp["specs"], is_leaf=lambda x: isinstance(x, P))
  assert sum(s != P() for s in specs) >= 4
  for x, spec in zip(jax.tree.leaves(state.params), specs):
    assert x.sharding.spec == spec
  # AdamW's moments follow their params; the step count is replicated.
  adam, = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  for moment in (adam.mu, adam.nu):
    assert [x.sharding.spec for x in jax.tree.leaves(moment)] == specs
  assert adam.count.sharding.spec == P()
  sharded = sharding_lib.per_device_bytes((state.params, state.opt_state))
  replicated = sharding_lib.per_device_bytes((data["state"].params, data["state"].opt_state))
  assert sharded < replicated / 4


def test_sharded_checkpoint_restores_across_meshes_exactly(runs, tmp_path):
  """Saved under fsdp=8 (each device's shards), restored under data=8 and back."""
  fsdp, data = runs["fsdp"], runs["data"]
  manager = ckpt_lib.make_manager(str(tmp_path / "a"))
  ckpt_lib.save(manager, 3, fsdp["state"], None, {"model": {}}, force=True)
  manager.wait_until_finished()
  target = step_lib.abstract_state(data["state"])
  on_data = ckpt_lib.restore(manager, 3, target)
  for a, b in zip(jax.tree.leaves(on_data), jax.tree.leaves(fsdp["state"])):
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(on_data.params))
  # And back: the replicated state saved, restored onto the fsdp layout.
  back = ckpt_lib.make_manager(str(tmp_path / "b"))
  ckpt_lib.save(back, 3, on_data, None, {"model": {}}, force=True)
  back.wait_until_finished()
  on_fsdp = ckpt_lib.restore(back, 3, step_lib.abstract_state(fsdp["state"]))
  for a, b in zip(jax.tree.leaves(on_fsdp), jax.tree.leaves(fsdp["state"])):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
  # A target layout the arrays cannot take: named, before anything is read.
  leaves, treedef = jax.tree.flatten(target)
  bad = jax.sharding.NamedSharding(_mesh(data=1, fsdp=8), P("fsdp"))
  index = [i for i, x in enumerate(leaves) if x.shape and x.shape[0] % 8][0]
  leaves[index] = jax.ShapeDtypeStruct(leaves[index].shape, leaves[index].dtype, sharding=bad)
  with pytest.raises(ValueError, match=r"restoring a checkpoint onto this mesh: array "
                                       r"'params/.*' of shape .* cannot be laid out as "
                                       r"P\('fsdp',\) on the mesh \(data=1 x fsdp=8\)"):
    ckpt_lib.restore(manager, 3, jax.tree.unflatten(treedef, leaves))
