"""Token-level fusion: every kind learns a relation across modalities, ignores absent
and invalid tokens, and matches direct computations; MBT reduces to late fusion;
MMP's predicted tokens stand in only for absent modalities; the model hands tokens
to fusion only when asked; bad input.

The synthetic task: modality a carries a value va in {0, 1, 2}, b a value vb, each as
a class prototype added to one random token of its sequence; the label is
(va + vb) mod 3, which neither modality alone tells. The direct computations use three
modalities (a third, c, with padding).
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import config_lib, fusion
from mmjax.fusion import mmp as mmp_lib
from mmjax.models import model as model_lib
from mmjax.models import registry as encoder_registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("a", "b", "c")
TASK_NAMES = ("a", "b")    # the learning task: two modalities keep compiles short
LENGTHS = {"a": 4, "b": 3, "c": 5}
NUM_CLASSES, RAW, WIDTH = 3, 8, 16
TRAIN_BATCH, EVAL_BATCH, TRAIN_STEPS = 64, 256, 400
CONFIGS = {
    "bottleneck": dict(num_classes=NUM_CLASSES, num_layers=2, fusion_layer=0,
                       num_bottlenecks=2),
    "cross_attention": dict(num_layers=1),
    "joint": dict(num_layers=1),
    "ovo_tokens": dict(),
    "mmp": dict(modalities=TASK_NAMES, backbone="joint",
                backbone_config={"num_layers": 1},    # as configs/fusion_mmp.py
                mask_rate={"shape": "linear", "init": 0.0, "end": 0.3, "begin": 80,
                           "steps": 80}),
    "proxy": dict(modalities=TASK_NAMES, mask_rate=0.1),
}


def _key(seed):
  return jax.random.key(seed, impl="rbg")


PROTOTYPES = jnp.asarray(np.random.default_rng(0).normal(size=(3, NUM_CLASSES, RAW)),
                         jnp.float32) * 2.0


def make_batch(key, batch, drop_rate):
  """Raw tokens [B, T_m, RAW], all-valid token masks, an MCAR mask, labels."""
  keys = jax.random.split(key, 8)
  va = jax.random.randint(keys[0], (batch,), 0, NUM_CLASSES)
  vb = jax.random.randint(keys[1], (batch,), 0, NUM_CLASSES)
  values = {"a": (0, va), "b": (1, vb)}
  tokens = {}
  for i, m in enumerate(TASK_NAMES):
    proto, v = values[m]
    noise = 0.5 * jax.random.normal(keys[2 + i], (batch, LENGTHS[m], RAW))
    where = jax.random.randint(keys[5 + i], (batch,), 0, LENGTHS[m])
    hot = jax.nn.one_hot(where, LENGTHS[m])[..., None]
    tokens[m] = noise + hot * PROTOTYPES[proto, v][:, None]
  token_mask = {m: jnp.ones((batch, LENGTHS[m]), bool) for m in TASK_NAMES}
  full = {m: jnp.ones(batch, bool) for m in TASK_NAMES}
  mask = fusion.modality_dropout(full, drop_rate, jax.random.fold_in(key, 99))
  return tokens, token_mask, mask, (va + vb) % NUM_CLASSES


class TokenClassifier(nn.Module):
  """Per-modality dense encoders of the raw tokens, the fusion, a task head."""
  kind: str
  config: tuple

  def setup(self):
    self.encoders = {m: nn.Dense(WIDTH) for m in TASK_NAMES}
    self.fusion = fusion.build_fusion(self.kind, **dict(self.config))
    self.head = (None if self.fusion.produces_task_output
                 else fusion.TaskHead(NUM_CLASSES))

  def __call__(self, tokens, token_mask, mask, train=False, step=None):
    encoded = {m: self.encoders[m](x) for m, x in tokens.items()}
    by_step = {} if step is None or self.kind != "mmp" else {"step": step}
    joint, aux = self.fusion(encoded, token_mask, mask, train=train, **by_step)
    return (joint if self.head is None else self.head(joint)), aux


train_batch = jax.jit(lambda key, step: make_batch(jax.random.fold_in(key, step),
                                                   TRAIN_BATCH, 0.2))


class Trained:
  """One kind trained with adam on the synthetic task; its compiled predict."""

  def __init__(self, kind):
    self.kind = kind
    config = {k: (tuple(sorted(v.items())) if isinstance(v, dict) else v)
              for k, v in CONFIGS[kind].items()}
    self.model = model = TokenClassifier(kind, tuple(sorted(config.items())))
    tokens, token_mask, mask, _ = train_batch(_key(0), 0)
    params = jax.jit(model.init)(
        {"params": _key(1), "dropout": _key(2)}, tokens, token_mask, mask)["params"]
    optimizer = optax.adam(3e-3)

    def loss_fn(params, tokens, token_mask, mask, labels, rng, i):
      logits, aux = model.apply({"params": params}, tokens, token_mask, mask,
                                train=True, step=i, rngs={"dropout": rng})
      return fusion.task_loss(logits, labels) + sum(
          v for k, v in aux.items() if k.startswith("loss/"))

    @jax.jit
    def step(params, opt_state, i):
      tokens, token_mask, mask, labels = make_batch(jax.random.fold_in(_key(0), i),
                                                    TRAIN_BATCH, 0.2)
      grads = jax.grad(loss_fn)(params, tokens, token_mask, mask, labels,
                                jax.random.fold_in(_key(3), i), i)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for i in range(TRAIN_STEPS):
      params, opt_state = step(params, opt_state, i)
    self.params = params
    self.predict = jax.jit(lambda p, t, tm, m: model.apply({"params": p}, t, tm, m)[0])
    self.tokens, self.token_mask, _, self.labels = make_batch(_key(4), EVAL_BATCH, 0.0)

  def accuracy(self, mask):
    logits = self.predict(self.params, self.tokens, self.token_mask, mask)
    return float(jnp.mean(jnp.argmax(logits, -1) == self.labels))


@pytest.fixture(scope="module", params=list(CONFIGS))
def trained(request):
  return Trained(request.param)


def _all(present=True):
  return {m: jnp.full(EVAL_BATCH, present) for m in TASK_NAMES}


def test_learns_the_cross_modal_relation_above_chance(trained):
  # Chance is 1/3; a and b together decide the label.
  assert trained.accuracy(_all()) > 0.7, trained.kind


def test_absent_modalities_and_invalid_tokens_do_not_reach_the_output(trained):
  rng = np.random.default_rng(1)
  mask = {m: jnp.asarray(rng.random(EVAL_BATCH) < 0.6) for m in TASK_NAMES}
  mask["a"] = mask["a"] | ~mask["b"]
  # Invalid tokens: the last token of b in every row.
  token_mask = dict(trained.token_mask, b=trained.token_mask["b"].at[:, -1].set(False))
  base = trained.predict(trained.params, trained.tokens, token_mask, mask)
  garbage = {m: jnp.where(mask[m][:, None, None] & token_mask[m][..., None], x,
                          jnp.asarray(rng.normal(size=x.shape) * 1e3, x.dtype))
             for m, x in trained.tokens.items()}
  np.testing.assert_array_equal(
      np.asarray(trained.predict(trained.params, garbage, token_mask, mask)),
      np.asarray(base))


def _tiny_inputs(batch=3, width=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = {m: jnp.asarray(rng.normal(size=(batch, LENGTHS[m], width)), jnp.float32)
            for m in NAMES}
  token_mask = {m: jnp.ones((batch, LENGTHS[m]), bool) for m in NAMES}
  token_mask["c"] = token_mask["c"].at[:, 3:].set(False)
  mask = {"a": jnp.array([True, False, True]), "b": jnp.array([True, True, False]),
          "c": jnp.array([True, True, False])}
  return tokens, token_mask, mask


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_ovo_tokens_matches_the_direct_formula():
  tokens, token_mask, mask = _tiny_inputs()
  module = fusion.build_fusion("ovo_tokens", num_heads=2)
  params = jax.jit(module.init)(_key(0), tokens, token_mask, mask)["params"]
  out, _ = jax.jit(module.apply)({"params": params}, tokens, token_mask, mask)
  p = jax.tree.map(np.asarray, params)
  dense = lambda x, name: x @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
  heads, hd = 2, 4
  contexts = []
  for i, m in enumerate(NAMES):
    rows = []
    for b in range(3):
      valid = {n: np.asarray(token_mask[n][b]) & bool(mask[n][b]) for n in NAMES}
      normed = {n: _layer_norm(np.asarray(tokens[n][b]), p["norm"]) for n in NAMES}
      others = [n for n in NAMES if n != m and bool(mask[n][b])]
      if not bool(mask[m][b]):
        rows.append(np.zeros(8))
        continue
      if others:
        mean = np.mean([normed[n][valid[n]].mean(0) for n in others], axis=0)
        query = dense(mean, "query").reshape(heads, hd)
      else:
        query = np.zeros((heads, hd))
      keys = dense(normed[m], "key").reshape(-1, heads, hd)
      values = dense(normed[m], "value").reshape(-1, heads, hd)
      context = []
      for h in range(heads):
        scores = keys[:, h] @ p["shared_w"][h].T @ query[h] / np.sqrt(hd)
        scores = np.where(valid[m], scores, -np.inf)
        w = np.exp(scores - scores.max())
        w /= w.sum()
        context.append(w @ values[:, h])
      rows.append(np.concatenate(context))
    contexts.append(np.stack(rows))
  presence = np.stack([np.asarray(mask[m], np.float32) for m in NAMES], 1)
  expected = dense(np.concatenate(contexts + [presence], axis=1), "out")
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_joint_is_the_class_token_of_one_transformer_over_present_tokens():
  tokens, token_mask, mask = _tiny_inputs()
  module = fusion.build_fusion("joint", num_layers=1)
  params = jax.jit(module.init)(_key(0), tokens, token_mask, mask)["params"]
  out, _ = jax.jit(module.apply)({"params": params}, tokens, token_mask, mask)
  # Row 1 has b and c only (c's first 3 tokens): the same as one sequence of them.
  block = fusion.tokens.Block(2, 16)
  types = params["type_embedding"]
  seq = jnp.concatenate([params["cls"][0], tokens["b"][1] + types[1],
                         tokens["c"][1, :3] + types[2]])[None]
  h = jax.jit(block.apply)({"params": params["block_0"]}, seq,
                        jnp.ones(seq.shape[:2], bool))
  expected = nn.LayerNorm().apply({"params": params["final_norm"]}, h[:, 0])
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(expected[0]), atol=1e-5)


def test_bottleneck_with_fusion_layer_at_depth_is_late_fusion():
  tokens, token_mask, _ = _tiny_inputs()
  tokens, token_mask = ({m: d[m] for m in TASK_NAMES} for d in (tokens, token_mask))
  every = {m: jnp.ones(3, bool) for m in TASK_NAMES}
  # A bottleneck updated by the last block reaches no one: exchange needs
  # fusion_layer <= num_layers - 2.
  build = functools.partial(fusion.build_fusion, "bottleneck", num_classes=4,
                            num_layers=2)
  params = jax.jit(build(fusion_layer=0).init)(_key(0), tokens, token_mask, every)
  for fusion_layer, same in ((1, True), (0, False)):
    apply = jax.jit(build(fusion_layer=fusion_layer).apply)   # unused params are ignored
    both = apply(params, tokens, token_mask, every)[0]
    alone = [apply(params, tokens, token_mask,
                   {n: jnp.full(3, n == m) for n in TASK_NAMES})[0] for m in TASK_NAMES]
    close = np.allclose(np.asarray(both), np.mean(np.asarray(alone), 0), atol=1e-5)
    assert close == same, fusion_layer


def test_cross_attention_stream_without_partner_skips_co_attention():
  tokens, token_mask, _ = _tiny_inputs()
  module = fusion.build_fusion("cross_attention", num_layers=1)
  only_a = {m: jnp.full(3, m == "a") for m in NAMES}
  params = jax.jit(module.init)(_key(0), tokens, token_mask, only_a)["params"]
  out = jax.jit(module.apply)({"params": params}, tokens, token_mask, only_a)[0]
  from mmjax.fusion.attention import FeedForward, MaskedSelfAttention

  @jax.jit
  def direct(params, x):   # self-attention, MLP, pooling of a's stream alone
    h = MaskedSelfAttention(2).apply({"params": params["a_self_attention_0"]}, x,
                                     jnp.ones(x.shape[:2], bool))
    h = FeedForward(16).apply({"params": params["a_mlp_0"]}, h)
    pooled = nn.LayerNorm().apply({"params": params["a_norm"]}, h.mean(1))
    zeros = jnp.zeros((3, 8))
    return nn.Dense(8).apply({"params": params["out"]}, jnp.concatenate(
        [pooled, zeros, zeros, jnp.tile(jnp.array([[1.0, 0.0, 0.0]]), (3, 1))], 1))

  expected = direct(params, tokens["a"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_mmp_uses_predicted_tokens_only_where_a_modality_is_absent():
  tokens, token_mask, mask = _tiny_inputs()
  module = fusion.build_fusion("mmp", modalities=NAMES, backbone="joint",
                               backbone_config=(("num_layers", 1),))
  variables = jax.jit(module.init)(_key(0), tokens, token_mask, mask)
  fill = functools.partial(jax.jit(module.apply, static_argnames="method"), variables,
                           method=mmp_lib.MMPFusion.fill)
  filled, filled_valid, filled_present, predicted = fill(tokens, token_mask, mask)
  assert bool(filled_present.all())
  for i, m in enumerate(NAMES):
    here = np.asarray(mask[m])
    x = np.where(np.asarray(token_mask[m])[..., None], np.asarray(tokens[m]), 0)
    np.testing.assert_array_equal(np.asarray(filled[m])[here], x[here])
    np.testing.assert_array_equal(np.asarray(filled[m])[~here],
                                  np.asarray(predicted[m])[~here])
    assert bool(np.asarray(filled_valid[m])[~here].all())
    # A modality's prediction never reads its own tokens.
    changed = dict(tokens, **{m: tokens[m] + 5.0})
    np.testing.assert_array_equal(np.asarray(fill(changed, token_mask, mask)[3][m]),
                                  np.asarray(predicted[m]))
  # In training, modalities are masked and the alignment loss is on them.
  heavy = fusion.build_fusion("mmp", modalities=NAMES, mask_rate=0.9,
                              backbone_config=(("num_layers", 1),))
  every = {m: jnp.ones(3, bool) for m in NAMES}
  _, aux = jax.jit(functools.partial(heavy.apply, train=True))(
      variables, tokens, token_mask, every, rngs={"dropout": _key(5)})
  assert float(aux["loss/mmp_alignment"]) > 0.0
  assert float(aux["stats/mmp_masked_fraction"]) > 0.0


def test_mmp_mask_rate_schedule_follows_the_step_the_model_hands_it():
  """A 'linear' mask_rate: no masking before `begin`, the end rate after the ramp;
  the model passes its step through the fusion wrapper to the token-level kind."""
  ramp = {"shape": "linear", "init": 0.0, "end": 0.9, "begin": 10, "steps": 10}
  config = _config("fusion_mmp")
  config.model.fusion.mask_rate = ml_collections.ConfigDict(ramp)
  model = model_lib.build(config.model)
  batch = _batch()
  batch["mask"] = {m: jnp.ones(4, bool) for m in batch["mask"]}
  variables = jax.jit(model.init)({"params": _key(0), "dropout": _key(1)}, batch)
  forward = jax.jit(lambda v, b, step: model.apply(v, b, train=True, step=step,
                                                 rngs={"dropout": _key(2)}))
  stats = {step: forward(variables, batch, step).aux for step in (0, 9, 20)}
  for step in (0, 9):
    assert float(stats[step]["stats/mmp_mask_rate"]) == 0.0
    assert float(stats[step]["stats/mmp_masked_fraction"]) == 0.0
  assert float(stats[20]["stats/mmp_mask_rate"]) == pytest.approx(0.9)
  assert float(stats[20]["stats/mmp_masked_fraction"]) > 0.3
  with pytest.raises(ValueError, match="mmp mask_rate must be in"):
    fusion.build_fusion("mmp", modalities=NAMES, mask_rate=1.0)
  with pytest.raises(ValueError, match="mmp mask_rate: unknown schedule shape"):
    fusion.build_fusion("mmp", modalities=NAMES, mask_rate={"shape": "cubic"})


def test_proxy_alignment_is_one_minus_cosine_on_pairs_present_together():
  tokens, token_mask, mask = _tiny_inputs()
  module = fusion.build_fusion("proxy", modalities=NAMES, mask_rate=0.0)
  variables = jax.jit(module.init)(_key(0), tokens, token_mask, mask)
  _, aux = jax.jit(module.apply)(variables, tokens, token_mask, mask)
  pooled = jax.jit(lambda params: {m: fusion.proxy.QueryPool(3, 2).apply(
      {"params": params[f"{m}_pool"]}, tokens[m], token_mask[m] & mask[m][:, None])
      for m in NAMES})(variables["params"])
  terms = []
  for target in NAMES:
    for source in NAMES:
      if source == target:
        continue
      k = [n for n in NAMES if n != source].index(target)
      p, c = np.asarray(pooled[source][:, 1 + k]), np.asarray(pooled[target][:, 0])
      cos = (p * c).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(c, axis=-1))
      both = np.asarray(mask[source] & mask[target])
      terms.extend((1 - cos)[both])
  assert float(aux["stats/proxy_alignment"]) == pytest.approx(np.mean(terms), rel=1e-4)
  assert float(aux["loss/proxy_alignment"]) == pytest.approx(0.2 * np.mean(terms),
                                                             rel=1e-4)


# --- the model: tokens only when asked, masks, errors --------------------------------

def _config(name, arg="runlocal,interaction"):
  return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)


def _batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.random((b, 32, 32, 3)), jnp.float32),
          "audio": jnp.asarray(rng.normal(size=(b, 4000)) * 0.1, jnp.float32),
          "text": jnp.asarray(np.where(np.arange(32) < 20, rng.integers(3, 200, (b, 32)),
                                       0), jnp.int32),
          "mask": {"image": jnp.array([True, False, True, True]),
                   "audio": jnp.array([True, True, False, True]),
                   "text": jnp.array([False, True, True, True])}}


@pytest.fixture(scope="module")
def joint_model():
  model = model_lib.build(_config("fusion_joint").model)
  batch = _batch()
  variables = jax.jit(lambda b: model.init({"params": _key(0)}, b))(batch)
  return model, variables, jax.jit(lambda v, b: model.apply(v, b))


def test_model_hands_tokens_and_all_false_masks_for_absent_modalities(joint_model):
  model, variables, apply = joint_model
  batch = _batch()
  out = apply(variables, batch)
  assert out.tokens["text"].shape == (4, 32, 16)
  assert out.tokens["image"].shape == (4, 16, 16)
  for m in model.modalities:
    absent = ~np.asarray(batch["mask"][m])
    assert not np.asarray(out.token_mask[m])[absent].any(), m
  # Padding of the text is invalid too.
  assert not np.asarray(out.token_mask["text"])[:, 20:].any()
  assert np.asarray(out.token_mask["text"])[1:, :20].all()
  # The absent modalities' inputs do not reach the logits.
  other = _batch(seed=1)
  other["mask"] = batch["mask"]
  mixed = {m: jnp.where(batch["mask"][m].reshape((-1,) + (1,) * (batch[m].ndim - 1)),
                        batch[m], other[m]) for m in model.modalities}
  out_mixed = apply(variables, {**mixed, "mask": batch["mask"]})
  np.testing.assert_allclose(np.asarray(out_mixed.logits), np.asarray(out.logits),
                             atol=1e-5)


def test_models_without_token_fusion_compute_no_tokens():
  for name, arg in (("default", None), ("fusion_concat", "runlocal")):
    config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)
    model = model_lib.build(config.model)
    assert not (model.fusion and fusion.needs_tokens(model.fusion["kind"]))
    shapes = jax.eval_shape(lambda: model.init_with_output(
        {"params": _key(0)}, _batch() if name != "default" else _default_batch(config)))
    out = shapes[0]
    assert out.tokens is None and out.token_mask is None
    assert all(x.ndim <= 2 for x in jax.tree.leaves(out)), name


def _default_batch(config):
  b = 2
  batch = {}
  for m, e in config.model.encoders.items():
    if e.kind == "vit":
      batch[m] = jnp.zeros((b, config.data.image_size, config.data.image_size, 3))
    elif e.kind == "text":
      batch[m] = jnp.ones((b, config.data.text_max_len), jnp.int32)
    elif e.kind == "audio":
      batch[m] = jnp.zeros((b, config.data.audio_samples))
  batch["mask"] = {m: jnp.ones(b, bool) for m in batch}
  return batch


class PooledOnly(nn.Module):
  width: int = 16

  @property
  def output_width(self):
    return self.width

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(self.width)(x)


def test_token_fusion_on_an_encoder_without_tokens_is_an_error():
  encoder_registry.ENCODERS.register(
      "pooled_only", encoder_registry.EncoderSpec(module=PooledOnly, sizes={"mu": {}},
                                                  default_variant="mu"),
      {"width": 16})
  try:
    config = _config("fusion_joint")
    config.model.encoders.audio = config_lib.encoder("pooled_only")
    with pytest.raises(ValueError, match=r"encoder of 'audio' .*pooled_only.*returns "
                                         r"only a pooled vector"):
      model_lib.build(config.model)
  finally:
    del encoder_registry.ENCODERS["pooled_only"]


@pytest.mark.parametrize("fields, message", [
    ({"fusion_layer": 3}, r"fusion_layer=3 is beyond the fusion's depth.*num_layers=2"),
    ({"num_bottlenecks": 0}, r"num_bottlenecks must be >= 1, got 0"),
])
def test_bottleneck_bad_fields(fields, message):
  config = _config("fusion_bottleneck", "interaction")
  for k, v in fields.items():
    config.model.fusion[k] = v
  with pytest.raises(ValueError, match=r"model.fusion: .*" + message):
    model_lib.build(config.model)


def test_mmp_predicting_a_modality_without_encoder_is_an_error():
  config = _config("fusion_mmp")
  config.model.fusion.predict = ("image", "depth")
  with pytest.raises(ValueError, match=r"mmp predict: the model has no encoder for "
                                       r"\['depth'\]"):
    model_lib.build(config.model)


def test_token_widths_that_differ_without_width_name_the_modalities():
  config = _config("fusion_joint")
  config.model.fusion.width = None
  config.model.encoders.image.width = 32
  model = model_lib.build(config.model)
  with pytest.raises(ValueError, match=r"tokens of one width, got widths "
                                       r"\{'audio': 16, 'image': 32, 'text': 16\}.*width"):
    jax.eval_shape(lambda: model.init({"params": _key(0)}, _batch()))
