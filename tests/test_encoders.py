"""Tests of the ViT and text encoders, the shared blocks and the registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers
from mmjax.models.heads import ProjectionHead
from mmjax.models.registry import ENCODERS, build_encoder

KEY = jax.random.key(0)


def init(module, x, seed=0):
  """Random variables with the module's own structure, shapes and dtypes.

  Built in NumPy from `jax.eval_shape(module.init, ...)`: the module's init
  is traced (so its structure is what is tested) but no XLA program has to
  be compiled for it, which keeps the suite fast on a small CPU.
  """
  shapes = jax.eval_shape(module.init, KEY, x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if getattr(path[-1], 'key', None) == 'scale':  # LayerNorm gains near 1
      return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(0.2 * noise, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _param_count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _images(batch=2, size=16, channels=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _tokens():
  # bos, bytes, eos, then padding (the byte tokenizer's layout).
  return jnp.array([[1, 40, 41, 42, 2, 0, 0, 0],
                    [1, 50, 2, 0, 0, 0, 0, 0],
                    [1, 60, 61, 62, 63, 64, 65, 2]], jnp.int32)


def stack_blocks(params, depth, path=('encoder',)):
  """Maps unscanned params (block_i) to the scanned layout (blocks)."""
  params = jax.tree.map(lambda a: a, params)  # shallow copy of dicts
  node = params
  for key in path:
    node = node[key]
  blocks = [node.pop(f'block_{i}') for i in range(depth)]
  node['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


# ---------------------------------------------------------------- ViT


@pytest.mark.parametrize('pool', ['cls', 'gap', 'map'])
def test_vit_shapes_each_pool(pool):
  enc = build_encoder('vit', 'mu', width=32, num_heads=2, pool=pool)
  images = _images()
  variables = init(enc, images)
  feats = enc.apply(variables, images, train=False)
  assert feats.shape == (2, 32) and enc.width == 32
  assert feats.dtype == jnp.float32
  assert np.all(np.isfinite(feats))
  # Each example is encoded on its own: batch order does not mix examples.
  swapped = enc.apply(variables, images[::-1])
  np.testing.assert_allclose(swapped, feats[::-1], atol=1e-5)


def test_vit_video_tubelets():
  enc = build_encoder('vit', 'mu', width=32, num_heads=2, tubelet=2,
                      patch_size=8, pool='cls')
  video = jax.random.normal(KEY, (2, 4, 16, 16, 3))
  variables = init(enc, video)
  # Tubelet embedding is a t x p x p x C -> D kernel.
  assert variables['params']['embedding']['kernel'].shape == (2, 8, 8, 3, 32)
  # 2 tubelets in time x 2 x 2 patches + cls token.
  assert variables['params']['pos_embedding'].shape == (1, 9, 32)
  assert enc.apply(variables, video).shape == (2, 32)


def test_vit_patch_embedding_is_a_linear_map_of_patches():
  """The conv patch embedding equals a matmul on flattened patches."""
  enc = build_encoder('vit', 'mu', width=16, num_heads=2, patch_size=4)
  images = _images(batch=1, size=8)
  variables = init(enc, images)
  params = variables['params']['embedding']
  _, state = enc.apply(variables, images,
      capture_intermediates=lambda mdl, _: mdl.name == 'embedding',
      mutable=['intermediates'])
  tokens = state['intermediates']['embedding']['__call__'][0]
  patches = np.asarray(images).reshape(1, 2, 4, 2, 4, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(1, 2, 2, 48)
  expected = patches @ np.asarray(params['kernel']).reshape(48, 16) + np.asarray(
      params['bias'])
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_vit_dropout_needs_train_and_changes_output():
  enc = build_encoder('vit', 'mu', width=32, num_heads=2, dropout=0.2,
                      drop_path=0.2)
  images = _images()
  variables = init(enc, images)
  eval_a = enc.apply(variables, images, train=False)
  eval_b = enc.apply(variables, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = enc.apply(variables, images, train=True,
                      rngs={'dropout': jax.random.key(1)})
  train_b = enc.apply(variables, images, train=True,
                      rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(train_a, eval_a)
  assert not np.allclose(train_a, train_b)


def test_drop_path_keeps_expectation_and_drops_whole_examples():
  x = jnp.ones((4000, 3))
  y = np.asarray(layers.drop_path(x, 0.25, jax.random.key(3)))
  kept = y[:, 0] != 0
  np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / 0.75], rtol=1e-6)
  assert np.all((y != 0) == kept[:, None])  # a whole row is kept or dropped
  assert abs(kept.mean() - 0.75) < 0.03
  assert abs(y.mean() - 1.0) < 0.05


# ---------------------------------------------------------------- text


@pytest.mark.parametrize('pool', ['eos', 'last', 'first', 'mean'])
@pytest.mark.parametrize('causal', [True, False])
def test_text_shapes_and_padding_invariance(pool, causal):
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                      pool=pool, causal=causal)
  tokens = _tokens()
  variables = init(enc, tokens)
  feats = enc.apply(variables, tokens)
  assert feats.shape == (3, 32) and feats.dtype == jnp.float32
  # Tokens after the first eos (including the padding) are rewritten with
  # arbitrary ids: the pooled output must not move.
  after_eos = np.asarray(layers_after_eos(tokens))
  noise = np.asarray(jax.random.randint(jax.random.key(5), tokens.shape, 3,
                                        259))
  scrambled = np.where(after_eos, noise, np.asarray(tokens))
  assert not np.array_equal(scrambled, tokens)
  np.testing.assert_allclose(enc.apply(variables, jnp.asarray(scrambled)), feats,
                             atol=1e-5)
  # ...while changing a token before eos (the first one, which every pool
  # sees even under causal attention) does move it.
  edited = np.asarray(tokens).copy()
  edited[:, 0] = 100
  assert not np.allclose(enc.apply(variables, jnp.asarray(edited)), feats,
                         atol=1e-4)


def layers_after_eos(tokens):
  is_eos = tokens == 2
  return (jnp.cumsum(is_eos, axis=1) - is_eos) > 0


def test_text_eos_pool_reads_the_eos_position():
  """'eos' pooling equals position-wise output at the first eos."""
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                      pool='eos')
  tokens = _tokens()
  variables = init(enc, tokens)
  feats = enc.apply(variables, tokens)
  _, state = enc.apply(variables, tokens,
      capture_intermediates=lambda mdl, _: mdl.name == 'encoder',
      mutable=['intermediates'])
  per_token = state['intermediates']['encoder']['__call__'][0]
  eos_pos = np.argmax(np.asarray(tokens) == 2, axis=1)
  np.testing.assert_allclose(feats, per_token[np.arange(3), eos_pos],
                             atol=1e-6)


def test_text_causal_prefix_does_not_see_future():
  """With causal attention, 'first' pooling ignores every later token."""
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                      pool='first', causal=True)
  tokens = _tokens()
  variables = init(enc, tokens)
  edited = tokens.at[:, 1].set(200)
  np.testing.assert_allclose(enc.apply(variables, edited),
                             enc.apply(variables, tokens), atol=1e-6)
  bidir = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                        pool='first', causal=False)
  assert not np.allclose(bidir.apply(variables, edited),
                         bidir.apply(variables, tokens), atol=1e-4)


def test_text_mean_pool_matches_direct_masked_mean():
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                      pool='mean', causal=False)
  tokens = _tokens()
  variables = init(enc, tokens)
  _, state = enc.apply(variables, tokens,
      capture_intermediates=lambda mdl, _: mdl.name == 'encoder',
      mutable=['intermediates'])
  per_token = np.asarray(state['intermediates']['encoder']['__call__'][0])
  lengths = np.argmax(np.asarray(tokens) == 2, axis=1) + 1
  expected = np.stack([per_token[i, :n].mean(0) for i, n in enumerate(lengths)])
  np.testing.assert_allclose(enc.apply(variables, tokens), expected, atol=1e-5)


# ---------------------------------------------------------------- counts


def test_parameter_counts_match_published():
  """ViT-B/16 (86M, no classifier) and CLIP ViT-B text tower (63M)."""
  vit = build_encoder('vit', 'B/16')
  vit_shapes = jax.eval_shape(
      vit.init, KEY, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  text = build_encoder('text', 'B')
  text_shapes = jax.eval_shape(
      text.init, KEY, jax.ShapeDtypeStruct((1, 77), jnp.int32))
  vit_count = _param_count(vit_shapes)
  text_count = _param_count(text_shapes)
  print(f'ViT-B/16 params: {vit_count:,}; CLIP-B text params: {text_count:,}')
  # ViT-B/16 without the classifier: 85.8M (reported as 86M).
  assert abs(vit_count - 85.8e6) / 85.8e6 < 0.01
  # CLIP's text transformer: 63M (Radford et al. 2021), without projection.
  assert abs(text_count - 63e6) / 63e6 < 0.01
  assert text.width == 512 and vit.width == 768
  assert vit_shapes['params']['pos_embedding'].shape == (1, 197, 768)


@pytest.mark.parametrize('variant,width,depth,heads', [
    ('Ti/16', 192, 12, 3), ('S/32', 384, 12, 6), ('B/8', 768, 12, 12),
    ('L/14', 1024, 24, 16), ('mu', 128, 2, 4)])
def test_vit_variants(variant, width, depth, heads):
  enc = build_encoder('vit', variant)
  assert (enc.width, enc.depth, enc.num_heads) == (width, depth, heads)
  if '/' in variant:
    assert enc.patch_size == int(variant.split('/')[1])


def test_text_variant_l_and_overrides():
  enc = build_encoder('text', 'L', vocab_size=259, max_len=100)
  assert (enc.width, enc.depth, enc.num_heads) == (768, 12, 12)
  assert (enc.vocab_size, enc.max_len) == (259, 100)


# ---------------------------------------------------------------- switches


@pytest.mark.parametrize('kind', ['vit', 'text'])
def test_remat_and_scan_match_plain(kind):
  """remat / scan_layers change memory and compile time, not the function."""
  if kind == 'vit':
    common = dict(width=32, num_heads=2, depth=2)
    inputs = _images()
  else:
    common = dict(width=32, num_heads=2, depth=2, max_len=8)
    inputs = _tokens()
  plain = build_encoder(kind, 'mu', **common)
  variables = init(plain, inputs)
  scanned_vars = {'params': stack_blocks(variables['params'], 2)}
  # The scanned module's own init has exactly the mapped layout.
  scanned = build_encoder(kind, 'mu', scan_layers=True, **common)
  assert (jax.tree.map(lambda a: a.shape,
                       jax.eval_shape(scanned.init, KEY, inputs)) ==
          jax.tree.map(lambda a: a.shape, scanned_vars))

  remat = build_encoder(kind, 'mu', remat=True, **common)
  both = build_encoder(kind, 'mu', scan_layers=True, remat=True, **common)

  @jax.jit  # one compile for all four variants
  def run(variables, scanned_vars):
    def loss(module, v):
      return jnp.sum(module.apply(v, inputs) ** 2)
    return (plain.apply(variables, inputs), remat.apply(variables, inputs),
            scanned.apply(scanned_vars, inputs),
            jax.value_and_grad(lambda v: loss(plain, v))(variables),
            jax.value_and_grad(lambda v: loss(both, v))(scanned_vars))

  expected, out_remat, out_scan, (loss_plain, g_plain), (loss_both, g_both) = (
      run(variables, scanned_vars))
  np.testing.assert_allclose(out_remat, expected, atol=1e-5)
  np.testing.assert_allclose(out_scan, expected, atol=1e-5)
  # Loss and gradients of scan+remat equal the plain module's.
  np.testing.assert_allclose(loss_both, loss_plain, rtol=1e-5)
  g_mapped = stack_blocks(g_plain['params'], 2)
  for got, want in zip(jax.tree.leaves(g_both['params']),
                       jax.tree.leaves(g_mapped)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_f32_params():
  enc = build_encoder('vit', 'mu', width=32, num_heads=2, dtype=jnp.bfloat16)
  images = _images()
  variables = init(enc, images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  _, state = enc.apply(variables, images,
      capture_intermediates=lambda mdl, _: mdl.name == 'encoder',
      mutable=['intermediates'])
  assert state['intermediates']['encoder']['__call__'][0].dtype == jnp.bfloat16
  feats = enc.apply(variables, images)
  reference = build_encoder('vit', 'mu', width=32, num_heads=2).apply(
      variables, images)
  assert feats.dtype == jnp.float32
  np.testing.assert_allclose(feats, reference, atol=0.1, rtol=0.1)
  text = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8,
                       dtype=jnp.bfloat16)
  tshapes = jax.eval_shape(text.init, KEY, _tokens())
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tshapes))


# ---------------------------------------------------------------- errors


def test_vit_bad_inputs():
  enc = build_encoder('vit', 'mu', width=32, num_heads=2, patch_size=4)
  with pytest.raises(ValueError, match='not divisible by patch_size=4'):
    enc.init(KEY, jnp.ones((1, 18, 16, 3)))
  with pytest.raises(ValueError, match='rank 3'):
    enc.init(KEY, jnp.ones((16, 16, 3)))
  with pytest.raises(ValueError, match='3 channels'):
    enc.init(KEY, jnp.ones((1, 16, 16, 1)))
  with pytest.raises(ValueError, match='float pixels'):
    enc.init(KEY, jnp.ones((1, 16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match='tubelet=2'):
    enc.init(KEY, jnp.ones((1, 3, 16, 16, 3)))
  variables = init(enc, jnp.ones((1, 16, 16, 3)))
  with pytest.raises(ValueError, match='position table'):
    enc.apply(variables, jnp.ones((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='pool'):
    build_encoder('vit', 'mu', pool='max').init(KEY, jnp.ones((1, 16, 16, 3)))


def test_text_bad_inputs():
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8)
  tokens = _tokens()
  variables = init(enc, tokens)
  with pytest.raises(ValueError, match=r'token ids must lie in \[0, 259\)'):
    enc.apply(variables, tokens.at[0, 1].set(259))  # concrete ids: checked
  with pytest.raises(ValueError, match=r'token ids must lie in'):
    enc.apply(variables, tokens.at[0, 1].set(-1))
  with pytest.raises(ValueError, match='exceeds the position table max_len=8'):
    enc.apply(variables, jnp.ones((1, 9), jnp.int32))
  with pytest.raises(ValueError, match=r'\[B, L\]'):
    enc.apply(variables, tokens[0])
  with pytest.raises(ValueError, match='integer'):
    enc.apply(variables, tokens.astype(jnp.float32))
  with pytest.raises(ValueError, match='eos_id=300'):
    build_encoder('text', 'mu', eos_id=300).init(KEY, tokens)


def test_text_out_of_vocab_ids_under_jit_poison_only_their_example():
  """Traced ids cannot raise; a bad id must not read another token's row."""
  enc = build_encoder('text', 'mu', width=32, num_heads=2, max_len=8)
  tokens = _tokens()
  variables = init(enc, tokens)
  apply = jax.jit(enc.apply)
  clean = apply(variables, tokens)
  # 259 is past the table; -1 would wrap to its last row; 6 is after eos
  # (ignored when valid, but still not a token of the vocabulary).
  for row, col, bad in ((0, 1, 259), (0, 1, -1), (1, 6, 300)):
    out = np.asarray(apply(variables, tokens.at[row, col].set(bad)))
    assert np.all(np.isnan(out[row])), (row, col, bad)
    others = np.arange(3) != row
    np.testing.assert_allclose(out[others], clean[others], atol=1e-6)


def test_registry_errors_list_valid_names():
  with pytest.raises(ValueError, match="unknown encoder kind 'cnn'.*vit"):
    build_encoder('cnn')
  with pytest.raises(ValueError, match=r"unknown vit variant 'H/14'.*B/16"):
    build_encoder('vit', 'H/14')
  with pytest.raises(ValueError, match=r"unknown vit variant 'B/x'"):
    build_encoder('vit', 'B/x')
  with pytest.raises(ValueError, match=r"unknown text variant 'B/16'.*mu, S"):
    build_encoder('text', 'B/16')
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\]"):
    build_encoder('vit', 'mu', widht=3)
  assert {'vit', 'text'} <= set(ENCODERS)


def test_every_kind_builds_from_its_default_variant():
  inputs = {
      'vit': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
      'text': jax.ShapeDtypeStruct((2, 80), jnp.int32),
      'bert': jax.ShapeDtypeStruct((2, 80), jnp.int32),
      'audio': jax.ShapeDtypeStruct((2, 16000), jnp.float32),
      'timeseries': jax.ShapeDtypeStruct((2, 64, 1), jnp.float32),
      'mlp': jax.ShapeDtypeStruct((2, 7), jnp.float32),
  }
  assert set(ENCODERS) == set(inputs)
  for kind, x in inputs.items():
    enc = build_encoder(kind)
    out, _ = jax.eval_shape(lambda x, enc=enc: enc.init_with_output(KEY, x), x)
    assert out.shape == (2, enc.output_width) == (2, enc.width), kind
    assert out.dtype == jnp.float32
  # Config-style overrides: dtype by name, lists for tuples.
  enc = build_encoder('audio', 'mu', dtype='bfloat16', patch_size=[4, 8])
  assert enc.dtype == jnp.bfloat16 and enc.patch_size == (4, 8)
  with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
    build_encoder('vit', dtype='bf17')


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_projection_head(kind):
  features = jax.random.normal(KEY, (3, 10))
  head = ProjectionHead(6, kind=kind, hidden_dim=12)
  variables = init(head, features)
  out = head.apply(variables, features)
  assert out.shape == (3, 6)
  p = variables['params']
  if kind == 'linear':
    want = features @ p['proj']['kernel']
  else:
    hidden = jax.nn.gelu(features @ p['hidden']['kernel'] + p['hidden']['bias'])
    want = hidden @ p['proj']['kernel'] + p['proj']['bias']
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'features \[B, F\]'):
    head.apply(variables, features[0])
  with pytest.raises(ValueError, match="unknown projection head kind 'conv'"):
    ProjectionHead(6, kind='conv').init(KEY, features)
