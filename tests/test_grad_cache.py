"""GradCache and plain accumulation: the same loss and gradient as the whole block."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config_lib
from mmjax.models import model as model_lib
from mmjax.train import grad_cache as cache_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib

ROWS, FEATURES, EMBED, CLASSES = 32, 6, 8, 3


class TinyModel(nn.Module):
  """One dense tower (with dropout) per modality, a logit scale and bias, task logits:
  the ModelOutput fields the objectives read, at a size that compiles in a blink."""
  modalities: tuple
  dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, *, train=False, step=None):
    del step
    embeddings, features = {}, {}
    for m in self.modalities:
      h = nn.tanh(nn.Dense(16, name=f"{m}_hidden")(batch[m]))
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      features[m] = h
      embeddings[m] = model_lib.l2_normalize(nn.Dense(EMBED, name=f"{m}_proj")(h))
    scale = self.param("logit_scale", lambda _: jnp.asarray(np.log(10.0), jnp.float32))
    bias = self.param("logit_bias", lambda _: jnp.asarray(-2.0, jnp.float32))
    joint = jnp.concatenate([features[m] for m in self.modalities], -1)
    return model_lib.ModelOutput(embeddings=embeddings, features=features,
                                 logit_scale=jnp.exp(scale), logit_bias=bias,
                                 logits=nn.Dense(CLASSES, name="task")(joint))


def _batch(modalities, rows=ROWS, seed=0):
  rng = np.random.default_rng(seed)
  batch = {m: rng.normal(size=(rows, FEATURES)).astype(np.float32) for m in modalities}
  batch["label"] = rng.integers(0, CLASSES, rows).astype(np.int32)
  batch["mask"] = {m: np.ones(rows, bool) for m in modalities}
  batch["mask"]["c" if "c" in modalities else modalities[-1]][::5] = False
  return batch


def _objective_config(kind, **fields):
  c = config_lib.base_config().objective
  c.kind = kind
  for k, v in fields.items():
    c[k] = v
  return c


def _mesh(**axes):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(axes), jax.devices()[:int(
      np.prod(list(axes.values())))])


def _gradients(model, kind, fields, mesh, batch, *, specs=None, **chunks):
  c = _objective_config(kind, **fields)
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                      jax.tree.map(lambda x: x[:2], batch))["params"]
  if specs is not None:
    specs = sharding_lib.param_specs(params, mesh, fsdp_min_size=0)
    params = jax.device_put(params, sharding_lib.named(mesh, specs))
  grad_fn = jax.jit(step_lib.make_grad_fn(model, objectives.build(c), c, mesh,
                                          specs=specs, **chunks))
  placed = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  loss, grads, metrics = grad_fn(params, placed, jax.random.key(3))
  return float(loss), jax.device_get(grads), jax.device_get(metrics)


def _assert_close(a, b, rtol):
  (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
  assert loss_a == pytest.approx(loss_b, rel=1e-6)
  flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    scale = max(float(np.abs(y).max()), 1e-6)
    assert float(np.abs(x - y).max()) <= rtol * scale
  # Not a vacuous match: the objective's gradient reaches every tower.
  for name, grad in grads_b.items():
    if name.endswith("_proj"):
      assert float(np.abs(grad["kernel"]).max()) > 0, name


# Two objectives per case (one compiled step each): every term's loss is checked in
# the metrics, the gradient is their sum's.
CASES = {
    "clip+siglip": ("ab", {}),
    "pairwise+gram": ("abc", {"anchor": "a", "pair_kind": "siglip"}),
}


@functools.lru_cache(maxsize=None)
def _case(kind, axes=(("data", 4),), specs=None, grad_cache=1):
  """`_gradients` of CASES[kind] on the mesh `axes`, computed once per module."""
  names, fields = CASES[kind]
  return _gradients(TinyModel(tuple(names)), kind, fields, _mesh(**dict(axes)),
                    _batch(tuple(names)), specs=specs, grad_cache=grad_cache)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_grad_cache_equals_the_whole_batch(kind):
  """4 devices x 8 rows in 4 chunks of 2 against the 8 rows at once: negatives from
  the whole global batch, the same loss (of each term) and gradients."""
  whole, cached = _case(kind), _case(kind, grad_cache=4)
  _assert_close(cached, whole, rtol=1e-5)
  for term in kind.split("+"):
    assert f"{term}/loss" in whole[2]
  for name, value in whole[2].items():
    np.testing.assert_allclose(cached[2][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_grad_cache_under_fsdp_equals_data_parallel():
  """CLIP's gathers and SigLIP's ring over two mesh axes (data x fsdp), params
  sharded, in 2 chunks, against data=4 on the whole batch."""
  fsdp = _case("clip+siglip", (("data", 2), ("fsdp", 2)), specs=True, grad_cache=2)
  _assert_close(fsdp, _case("clip+siglip"), rtol=1e-5)


def test_grad_cache_uses_the_same_dropout_masks_in_both_passes():
  """With dropout, GradCache's gradient is the exact gradient of the loss of the
  chunks embedded with keys fold_in(device key, i): a pass that drew other masks than
  the first would not be."""
  model, batch = TinyModel(("a", "b"), dropout=0.5), _batch(("a", "b"), rows=8)
  mesh, c = _mesh(data=1), _objective_config("clip")
  k = 4
  params = model.init({"params": jax.random.key(0)}, batch)["params"]
  loss, grads, _ = _gradients(model, "clip", {}, mesh, batch, grad_cache=k)
  device_key = jax.random.fold_in(jax.random.key(3), 0)

  def reference(params):
    outs = [model.apply({"params": params}, jax.tree.map(lambda x: x[i * 2:(i + 1) * 2],
                                                         batch), train=True,
                        rngs={"dropout": jax.random.fold_in(device_key, i)})
            for i in range(k)]
    out = model_lib.ModelOutput(
        embeddings={m: jnp.concatenate([o.embeddings[m] for o in outs]) for m in "ab"},
        features={}, logit_scale=outs[0].logit_scale)
    return objectives.build(c)(out, batch, c)[0]

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
  assert loss == pytest.approx(float(ref_loss), rel=1e-6)
  for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert float(np.abs(x - y).max()) <= 1e-5 * max(float(np.abs(y).max()), 1e-6)
  # The masks matter: without dropout the loss is another one.
  undropped = model_lib.ModelOutput(
      embeddings=model.apply({"params": params}, batch).embeddings, features={},
      logit_scale=jnp.exp(params["logit_scale"]))
  assert abs(float(objectives.build(c)(undropped, batch, c)[0]) - loss) > 1e-3


def test_plain_accumulation_for_task_is_the_mean_of_chunk_gradients():
  model, batch = TinyModel(("a", "b")), _batch(("a", "b"))
  mesh = _mesh(data=2)
  whole = _gradients(model, "task", {}, mesh, batch)
  accumulated = _gradients(model, "task", {}, mesh, batch, microbatches=4)
  assert accumulated[2]["task/accuracy"] == pytest.approx(whole[2]["task/accuracy"])
  _assert_close_task(accumulated, whole)


def _assert_close_task(a, b):
  assert a[0] == pytest.approx(b[0], rel=1e-6)
  # Only the task head and the hidden layers take a gradient from the cross-entropy.
  for name in ("task", "a_hidden", "b_hidden"):
    for x, y in zip(jax.tree.leaves(a[1][name]), jax.tree.leaves(b[1][name])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert float(np.abs(jax.tree.leaves(b[1][name])[0]).max()) > 0


def _config(kind="clip", batch_size=64, **fields):
  c = config_lib.base_config()
  c.objective.kind = kind
  c.batch_size = batch_size
  for k, v in fields.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_bad_microbatches():
  cache_lib.check_config(_config(**{"grad_cache.microbatches": 8}), 8)    # 8 rows / 8
  cache_lib.check_config(_config("task", microbatches=4), 8)
  with pytest.raises(ValueError, match=r"grad_cache.microbatches=3 does not divide the "
                                       r"per-device batch of 8 \(batch_size 64 over 8"):
    cache_lib.check_config(_config(**{"grad_cache.microbatches": 3}), 8)
  with pytest.raises(ValueError, match=r"config.microbatches=3 does not divide"):
    cache_lib.check_config(_config("task", microbatches=3), 8)
  with pytest.raises(ValueError, match=r"microbatches=2: plain accumulation .* 'clip'.*"
                                       r"config.grad_cache.microbatches=2 \(GradCache\)"):
    cache_lib.check_config(_config("siglip+clip", microbatches=2), 8)
  with pytest.raises(ValueError, match=r"objective.kind 'gram\+matching' has \['matching'\]"):
    cache_lib.check_config(_config("gram+matching", **{"grad_cache.microbatches": 2}), 8)
  with pytest.raises(ValueError, match="for 'task' use config.microbatches"):
    cache_lib.check_config(_config("task", **{"grad_cache.microbatches": 2}), 8)
  with pytest.raises(ValueError, match="set one of them"):
    cache_lib.check_config(_config("task", microbatches=2,
                                   **{"grad_cache.microbatches": 2}), 8)
  with pytest.raises(ValueError, match=r"config.microbatches must be an int >= 1"):
    cache_lib.check_config(_config("task", microbatches=0), 8)
