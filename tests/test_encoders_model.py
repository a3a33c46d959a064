"""`MultimodalModel` runs every configured encoder kind and skips nothing."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import models
from mmjax.models.registry import build_encoder

KEY = jax.random.key(0)
BATCH, EMBED_DIM = 3, 16

# One tiny encoder of every registered kind, keyed by modality name.
ENCODERS = {
    'image': dict(kind='vit', variant='mu', width=32, num_heads=2, depth=1,
                  patch_size=8),
    'caption': dict(kind='text', variant='mu', width=24, num_heads=2, depth=1,
                    max_len=8),
    'sound': dict(kind='audio', variant='mu', width=32, num_heads=2, depth=1,
                  sample_rate=8000, n_fft=128, hop=64, n_mels=16,
                  patch_size=[4, 8], max_frames=16),
    'table': dict(kind='mlp', variant='mu', width=20, depth=1),
    'sensor': dict(kind='timeseries', variant='mu', width=32, num_heads=2,
                   depth=1, channels=2, max_len=16),
}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((BATCH, 5)).astype(np.float32)
  table[0, 2] = np.nan  # a missing value
  return {
      'image': jnp.asarray(rng.standard_normal((BATCH, 16, 16, 3)), jnp.float32),
      'caption': jnp.array([[1, 40, 41, 2, 0, 0, 0, 0],
                            [1, 50, 2, 0, 0, 0, 0, 0],
                            [1, 60, 61, 62, 63, 64, 65, 2]], jnp.int32),
      'sound': jnp.asarray(rng.standard_normal((BATCH, 700)), jnp.float32),
      'table': jnp.asarray(table),
      'sensor': jnp.asarray(rng.standard_normal((BATCH, 16, 2)), jnp.float32),
      'mask': {m: jnp.ones((BATCH,), bool) for m in ENCODERS},
      'label': jnp.zeros((BATCH,), jnp.int32),
  }


def _fill(shapes, seed=0):
  """NumPy-filled variables of the given structure (no init compile)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', None)
    if name == 'scale':  # LayerNorm gains near 1
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape),
                         leaf.dtype)
    if name in ('count', 'mean', 'm2'):  # tabular running statistics
      return jnp.asarray(rng.uniform(1.0, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _config(encoders):
  """`config.model` of the base config with these encoders."""
  config = config_lib.base_config().model
  with config.unlocked():
    config.encoders = ml_collections.ConfigDict(
        {m: ml_collections.ConfigDict(e) for m, e in encoders.items()})
  config.embed_dim = EMBED_DIM
  return config


def test_every_encoder_kind_runs_and_matches_its_standalone_tower():
  model = models.build(_config(ENCODERS))
  batch = _batch()
  variables = _fill(jax.eval_shape(model.init, KEY, batch))
  towers = {
      m: build_encoder(c['kind'], c['variant'],
                       **{k: v for k, v in c.items()
                          if k not in ('kind', 'variant')})
      for m, c in ENCODERS.items()}

  @jax.jit  # one compile for the model and every standalone tower
  def run(variables, batch):
    standalone = {
        m: tower.apply({c: v[f'towers_{m}'] for c, v in variables.items()
                        if f'towers_{m}' in v}, batch[m])
        for m, tower in towers.items()}
    return model.apply(variables, batch), standalone

  out, standalone = run(variables, batch)
  assert set(out.embeddings) == set(out.features) == set(ENCODERS)
  assert out.logits is None and out.joint is None
  np.testing.assert_allclose(out.logit_scale,
                             np.exp(variables['params']['logit_scale']),
                             rtol=1e-6)
  for m, config in ENCODERS.items():
    emb, feats = np.asarray(out.embeddings[m]), np.asarray(out.features[m])
    assert emb.shape == (BATCH, EMBED_DIM), m
    assert feats.shape == (BATCH, config['width']), m
    assert np.all(np.isfinite(feats)), m
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    # Features are the standalone encoder's output with the same variables;
    # embeddings are the normalised linear projection of them.
    np.testing.assert_allclose(feats, standalone[m], rtol=1e-4, atol=1e-5)
    projected = feats @ np.asarray(
        variables['params'][f'heads_{m}']['proj']['kernel'])
    np.testing.assert_allclose(
        emb, projected / np.linalg.norm(projected, axis=-1, keepdims=True),
        rtol=1e-4, atol=1e-5)


def test_a_configured_modality_missing_from_the_batch_is_an_error():
  encoders = {m: ENCODERS[m] for m in ('image', 'table')}
  model = models.build(_config(encoders))
  batch = {k: v for k, v in _batch().items() if k != 'table'}
  with pytest.raises(ValueError, match="expects modality 'table'"):
    jax.eval_shape(model.init, KEY, batch)


def test_bad_encoder_config_fails_at_build_naming_the_problem():
  with pytest.raises(ValueError, match="unknown encoder kind 'cnn'.*vit"):
    models.build(_config({'image': dict(kind='cnn')}))
  with pytest.raises(ValueError, match=r"unknown vit variant 'XL'.*Ti, S, B"):
    models.build(_config({'image': dict(kind='vit', variant='XL')}))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\]"):
    models.build(_config({'image': dict(kind='vit', widht=3)}))
