"""Fine-tuning parts: freezing and per-part learning rates (`config.optimizer.rules`),
LoRA adapters (`config.model.lora`), and their errors."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import config_lib, experiment, models
from mmjax.data import pipeline
from mmjax.models import lora as lora_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives, trainer
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIT = (("towers_image", "frozen"), ("heads_image", "frozen"))


def _tiny(**lora):
  """tests/configs/tiny.py with smaller towers (patch stem, width 16) and `model.lora`."""
  c = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  c.model.embed_dim = 16
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=16, depth=1,
                                             num_heads=2, mlp_dim=32)
  c.model.encoders.text = config_lib.encoder("text", "mu", width=16, depth=1, num_heads=2,
                                            mlp_dim=32, max_len=56)
  c.optimizer.warmup_steps = 0
  for k, v in lora.items():
    c.model.lora[k] = v
  return c


def _leaves(tree):
  return {opt_lib.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _state_bytes(opt_state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))


def _param_bytes(tree, keep=lambda path: True) -> int:
  return sum(x.nbytes for path, x in _leaves(tree).items() if keep(path))


def _mlp_run(rules, mesh, steps=2):
  """(initial params, final state, metrics) after `steps` CLIP steps of a two-tower MLP
  model (modalities 'x' and 'y') under `rules`, on `mesh`."""
  encoder = dict(kind="mlp", variant="mu", width=8, depth=1, norm="none")
  model = models.MultimodalModel(encoders={"x": encoder, "y": encoder}, embed_dim=4)
  config = config_lib.base_config()
  config.optimizer.warmup_steps = 0
  config.optimizer.rules = rules
  rng = np.random.default_rng(0)
  batch = {m: rng.normal(size=(8, 5)).astype(np.float32) for m in ("x", "y")}
  batch["mask"] = {m: np.ones(8, bool) for m in ("x", "y")}
  tx = opt_lib.make_optimizer(config.optimizer, 10)
  state = step_lib.create_train_state(model, tx, batch, jax.random.key(0), mesh)
  initial = _leaves(state.params)
  frozen = opt_lib.frozen_mask(config.optimizer, state.params)
  train_step = step_lib.make_train_step(model, objectives.get("clip"), config.objective,
                                        mesh, frozen=frozen)
  batch = pipeline.to_global(batch, mesh)
  for i in range(steps):
    state, metrics = train_step(state, batch, jax.random.key(i))
  return initial, state, metrics


def test_frozen_parts_stay_bit_identical_and_have_no_optimizer_state(mesh1):
  initial, state, metrics = _mlp_run(
      (("towers_x", "frozen"), ("heads_x", "frozen"), ("towers_y", 0.5)), mesh1)
  after = _leaves(state.params)
  frozen = [p for p in initial if p.startswith(("towers_x", "heads_x"))]
  assert frozen and len(frozen) < len(initial)
  for path in initial:
    if path in frozen:
      np.testing.assert_array_equal(after[path], initial[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], initial[path]), path
  # The state holds AdamW's two moments of the trained params and nothing for the
  # frozen ones (the rest: step counters).
  assert float(metrics["grad_norm"]) > 0
  trained = _param_bytes(state.params, lambda p: p not in frozen)
  assert 0 <= _state_bytes(state.opt_state) - 2 * trained <= 64
  assert _state_bytes(state.opt_state.inner_states[opt_lib.FROZEN]) == 0


def _toy():
  params = {"logit_scale": jnp.float32(1.0),
            "towers_image": {"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), -0.0)},
            "towers_text": {"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), 0.1)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) + jnp.arange(p.size).reshape(
      p.shape) * 0.01, params)
  return params, grads


def _opt_config(rules=()):
  c = config_lib.base_config().optimizer
  c.lr, c.warmup_steps, c.min_lr_ratio, c.clip_norm = 0.05, 0, 1.0, 0.5
  c.rules = rules
  return c


def test_lr_multiplier_scales_the_update_exactly():
  params, grads = _toy()
  rules = opt_lib.parse_rules((("towers_image", "frozen"), ("towers_text/w", 0.1)))
  sgd = opt_lib.with_rules(optax.sgd(0.1), rules)
  updates, _ = jax.jit(sgd.update)(grads, sgd.init(params), params)
  plain, _ = jax.jit(optax.sgd(0.1).update)(grads, optax.sgd(0.1).init(params))
  # 0.1 x the update, up to one rounding (under jit XLA may fold 0.1 into SGD's -lr).
  np.testing.assert_allclose(updates["towers_text"]["w"], 0.1 * plain["towers_text"]["w"],
                             rtol=1e-6, atol=0)
  np.testing.assert_array_equal(updates["towers_text"]["b"], plain["towers_text"]["b"])
  assert not np.any(np.asarray(updates["towers_image"]["w"]))
  # AdamW, clipping (over every gradient: nothing is frozen) and the clamp: the
  # multiplier scales the final update, and the state is that of a run without rules.
  scaled = opt_lib.make_optimizer(_opt_config((("towers_text", 0.1),)), 10)
  base = opt_lib.make_optimizer(_opt_config(), 10)
  state = scaled.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(base.init(params))
  u_scaled, _ = jax.jit(scaled.update)(grads, state, params)
  u_base, _ = jax.jit(base.update)(grads, base.init(params), params)
  for k in ("w", "b"):
    np.testing.assert_allclose(u_scaled["towers_text"][k], 0.1 * u_base["towers_text"][k],
                               rtol=1e-6, atol=0)
  np.testing.assert_array_equal(u_scaled["towers_image"]["w"], u_base["towers_image"]["w"])


def test_frozen_params_get_zero_updates_even_from_the_clamp():
  params, grads = _toy()
  params["logit_scale"] = jnp.float32(9.0)          # above log(100): the clamp would act
  tx = opt_lib.make_optimizer(_opt_config((("logit_scale|towers_image", "frozen"),)), 10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  assert float(updates["logit_scale"]) == 0.0
  assert not np.any(np.asarray(updates["towers_image"]["w"]))
  assert np.all(np.asarray(updates["towers_text"]["w"]) != 0)
  mask = opt_lib.frozen_mask(_opt_config((("logit_scale|towers_image", "frozen"),)), params)
  assert mask == {"logit_scale": True, "towers_image": {"w": True, "b": True},
                  "towers_text": {"w": False, "b": False}}
  assert opt_lib.frozen_mask(_opt_config((("towers_text", 2.0),)), params) is None


@pytest.mark.parametrize("rules, match", [
    ((("towers_audio", "frozen"),),
     r"optimizer\.rules\[0\] \('towers_audio', 'frozen'\) applies to no parameter: it "
     r"matches no parameter path.*logit_scale, towers_image/b, towers_image/w"),
    ((("towers_image", "frozen"), ("towers_image/w", 0.5)),
     r"optimizer\.rules\[1\] .*taken by an earlier rule"),
    ((("tower", "frozen"),), r"rules\[0\] \('tower', 'frozen'\) applies to no parameter"),
])
def test_rule_that_takes_no_parameter_is_an_error(rules, match):
  params, _ = _toy()
  with pytest.raises(ValueError, match=match):
    opt_lib.make_optimizer(_opt_config(rules), 10).init(params)
  with pytest.raises(ValueError, match=match):
    opt_lib.frozen_mask(_opt_config(rules), params)


@pytest.mark.parametrize("rules, match", [
    ((("towers_image", 0.0),), r"rules\[0\] \('towers_image'\): the learning-rate "
                                r"multiplier must be a finite number > 0"),
    ((("towers_image", "freeze"),), r"rules\[0\] \('towers_image'\): action 'freeze' "
                                     r"is neither 'frozen'"),
    ((("towers_(image", "frozen"),), r"rules\[0\]: pattern 'towers_\(image' is not a "
                                      r"regular expression"),
    (("towers_image",), r"rules\[0\] must be a pair"),
    ((("", 0.5),), r"rules\[0\]: the pattern must be a non-empty string"),
])
def test_bad_rule_is_an_error_at_config_check(rules, match):
  with pytest.raises(ValueError, match=r"optimizer\." + match):
    opt_lib.check_optimizer_config(_opt_config(rules))


def test_lora_merge_of_a_scanned_stack():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 4, 8, 32)).astype(np.float32)   # [depth, heads, hd, D]
  params = {"towers_t": {"encoder": {"blocks": {"attn": {"out": {"kernel": kernel}}}}}}
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets=("attn/out",))
  adapters = lora_lib.init_adapters(jax.random.key(0), params, spec)
  node = adapters["towers_t"]["encoder"]["blocks"]["attn"]["out"]
  assert node["a"].shape == (3, 32, 2) and node["b"].shape == (3, 2, 32)
  b = rng.normal(size=(3, 2, 32)).astype(np.float32)
  node["b"] = b
  merged = lora_lib.merge(params, adapters, spec.scale)
  got = merged["towers_t"]["encoder"]["blocks"]["attn"]["out"]["kernel"]
  for layer in range(3):
    want = kernel[layer] + 2.0 * (np.asarray(node["a"][layer]) @ b[layer]).reshape(4, 8, 32)
    np.testing.assert_allclose(got[layer], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora, match", [
    (dict(rank=4, targets=("attn/qkv",)),
     r"model\.lora\.targets: 'attn/qkv' matches no kernel of the towers \['image', "
     r"'text'\]; their kernel names: \['attn/key', 'attn/out', 'attn/query', "
     r"'attn/value', 'mlp/fc1', 'mlp/fc2'\]"),
    (dict(rank=4, towers=("audio",)), r"model\.lora\.towers: \['audio'\] not among"),
    (dict(rank=-1), r"model\.lora\.rank must be a whole number >= 0"),
    (dict(rank=4, alpha=-1.0), r"model\.lora\.alpha must be a finite number >= 0"),
    (dict(rank=4, targets=()), r"model\.lora\.targets must be a non-empty tuple"),
])
def test_bad_lora_config_is_an_error(lora, match, mesh1):
  config = _tiny(**lora)
  with pytest.raises(ValueError, match=match):
    experiment.check_config(config, mesh1)
    lora_lib.sites(_tiny_params(), experiment.build_model(config).spec)


@functools.lru_cache(maxsize=None)
def _tiny_params():
  """The shapes of the tiny config's params."""
  config = _tiny()
  model = experiment.build_model(config)
  return jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, _sample(config)),
                        jax.random.key(0))["params"]


def _sample(config, split="train", size=1):
  source = pipeline.make_source(config.data, split)
  return experiment.sample_batch(source, experiment.make_featurize(config), size=size)


def test_lora_run_trains_the_adapters_only_and_merges(tmp_path):
  """A trainer run with LoRA on the text tower (and its head trained by a rule): its
  checkpoint holds the adapters, the base params stay as initialised, the adapters and
  the head train, the optimizer state holds their moments only; the merged params give
  the unmerged function."""
  config = _tiny(rank=2, towers=("text",))
  config.optimizer.rules = (("heads_text", 1.0),)
  config.optimizer.lr = 0.01
  config.total_steps = config.checkpoint_every_steps = 2
  del config.evals["retrieval"]          # evaluation runs `model.apply`: checked below
  workdir = str(tmp_path)
  metrics = trainer.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["train/loss"])

  model = experiment.build_model(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              adapters=experiment.adapters_key(config))
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  initial = step_lib.create_train_state(model, tx, _sample(config), init_rng,
                                        mesh_lib.make_mesh(config.mesh))
  manager = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    final = ckpt_lib.restore(manager, 2, step_lib.abstract_state(initial))
  finally:
    manager.close()
  before, after = _leaves(initial.params), _leaves(final.params)
  assert before.keys() == after.keys()
  trained = [p for p in before if p.startswith(("lora/", "heads_text/"))]
  assert {p.split("/")[1] for p in trained if p.startswith("lora/")} == {"towers_text"}
  for path in before:
    if path not in trained:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert not any(np.any(before[p]) for p in trained if p.endswith("/b"))   # B = 0
  assert all(not np.array_equal(after[p], before[p]) for p in trained if p.endswith("/b"))
  assert 0 <= (_state_bytes(final.opt_state)
               - 2 * _param_bytes(final.params, lambda p: p in trained)) <= 64

  batch = _sample(config, "test", size=4)
  plain = jax.jit(lambda p, b: model.model.apply({"params": p}, b))
  merged = np.asarray(plain(model.merge(final.params), batch).embeddings["text"])
  unmerged = np.asarray(jax.jit(lambda p, b: model.apply_unmerged({"params": p}, b))(
      final.params, batch).embeddings["text"])
  base = np.asarray(plain(lora_lib.split(final.params)[0], batch).embeddings["text"])
  diff = np.abs(merged - unmerged).max()
  assert diff <= 1e-5 * np.abs(unmerged).max()
  assert np.abs(merged - base).max() > 100 * max(diff, 1e-7)


def test_config_defaults_name_every_lora_kernel_and_no_rule():
  base = config_lib.base_config()
  assert tuple(base.model.lora.targets) == tuple(lora_lib.KERNELS) == config_lib.LORA_KERNELS
  assert base.model.lora.rank == 0 and base.optimizer.rules == ()
  assert experiment.adapters_key(base) is None
  assert lora_lib.spec_from_config(config_lib.lora_config(rank=8)).scale == 1.0
  assert lora_lib.spec_from_config(config_lib.lora_config(rank=8, alpha=16)).scale == 2.0
