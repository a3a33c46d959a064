"""Tests of the tabular MLP encoder and the time-series transformer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.models import mlp
from mmjax.models.registry import build_encoder

KEY = jax.random.key(0)


def _init(module, *args, seed=0):
  """NumPy-filled params with the module's own structure (no compile)."""
  shapes = jax.eval_shape(module.init, KEY, *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', None)
    if getattr(path[0], 'key', None) == 'batch_stats':
      return jnp.zeros(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape)
    if name == 'scale':
      return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(0.2 * noise, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _table(rows, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal([10.0, -3.0, 0.5], [5.0, 0.1, 2.0], (rows, 3))
  x[rng.uniform(size=x.shape) < 0.25] = np.nan
  return x.astype(np.float32)


# ---------------------------------------------------------------- tabular


def test_running_stats_equal_stats_of_everything_seen():
  enc = build_encoder('mlp', 'mu', width=16)
  a, b = _table(6, 1), _table(10, 2)
  variables = _init(enc, jnp.asarray(a))
  step = jax.jit(lambda v, x: enc.apply(v, x, train=True,
                                        mutable=['batch_stats']))
  _, state = step(variables, jnp.asarray(a))
  np.testing.assert_allclose(state['batch_stats']['mean'],
                             np.nanmean(a, axis=0), rtol=1e-5)
  _, state = step({**variables, **state}, jnp.asarray(b))
  seen = np.concatenate([a, b])
  stats = state['batch_stats']
  np.testing.assert_array_equal(stats['count'], (~np.isnan(seen)).sum(0))
  np.testing.assert_allclose(stats['mean'], np.nanmean(seen, 0), rtol=1e-5)
  np.testing.assert_allclose(stats['m2'] / (stats['count'] - 1),
                             np.nanvar(seen, 0, ddof=1), rtol=1e-4)


def test_running_stats_sum_over_devices(mesh8):
  enc = build_encoder('mlp', 'mu', width=16, axis_name='data')
  x = _table(16, 3)
  variables = _init(enc, jnp.asarray(x))

  def per_device(v, xs):
    _, state = enc.apply(v, xs, train=True, mutable=['batch_stats'])
    return state['batch_stats']

  stats = jax.jit(jax.shard_map(per_device, mesh=mesh8, in_specs=(P(), P('data')),
                                out_specs=P()))(
      variables, jax.device_put(jnp.asarray(x), NamedSharding(mesh8, P('data'))))
  np.testing.assert_allclose(stats['mean'], np.nanmean(x, 0), rtol=1e-5)
  np.testing.assert_allclose(stats['m2'] / (stats['count'] - 1),
                             np.nanvar(x, 0, ddof=1), rtol=1e-4)


def test_tabular_forward_matches_direct_formula():
  """One layer, running norm: LN(gelu([z, missing] @ W + b))."""
  enc = build_encoder('mlp', 'mu', width=8, depth=1)
  x = _table(5, 4)
  variables = _init(enc, jnp.asarray(x))
  mean = np.array([9.0, -3.0, 1.0], np.float32)
  count = np.array([11.0, 21.0, 5.0], np.float32)
  var = np.array([4.0, 0.01, 9.0], np.float32)
  variables['batch_stats'] = {'count': jnp.asarray(count),
                              'mean': jnp.asarray(mean),
                              'm2': jnp.asarray(var * (count - 1))}
  got = enc.apply(variables, jnp.asarray(x))

  missing = np.isnan(x)
  z = np.where(missing, 0.0, (np.nan_to_num(x) - mean) / np.sqrt(var + 1e-5))
  h = np.concatenate([z, missing.astype(np.float32)], 1)
  p = variables['params']
  h = h @ np.asarray(p['dense_0']['kernel']) + np.asarray(p['dense_0']['bias'])
  h = np.asarray(jax.nn.gelu(h))
  mu, sd = h.mean(-1, keepdims=True), np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  want = ((h - mu) / sd * np.asarray(p['out_norm']['scale']) +
          np.asarray(p['out_norm']['bias']))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The missing indicator matters: a NaN differs from a value at the mean.
  at_mean = np.where(missing, mean, x)
  assert not np.allclose(enc.apply(variables, jnp.asarray(at_mean))[missing.any(1)],
                         got[missing.any(1)], atol=1e-4)


@pytest.mark.parametrize('norm', ['learned', 'none'])
def test_tabular_other_norms(norm):
  enc = build_encoder('mlp', 'mu', width=16, norm=norm)
  x = jnp.asarray(_table(4, 5))
  variables = _init(enc, x)
  assert 'batch_stats' not in variables
  out = enc.apply(variables, x, train=False)
  assert out.shape == (4, 16) and np.all(np.isfinite(out))


def test_tabular_bad_inputs():
  enc = build_encoder('mlp', 'mu', width=16)
  x = jnp.asarray(_table(4, 6))
  variables = _init(enc, x)
  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    enc.apply(variables, x, train=True)
  with pytest.raises(ValueError, match='Inf'):
    enc.apply(variables, x.at[0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match=r'\[B, F\]'):
    enc.apply(variables, x[0])
  with pytest.raises(ValueError, match='initialised for 3'):
    enc.apply(variables, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='float'):
    enc.apply(variables, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='norm='):
    build_encoder('mlp', norm='batch').init(KEY, x)
  assert mlp.NORMS == ('running', 'learned', 'none')


# ---------------------------------------------------------------- series


def _series(batch=2, steps=24, channels=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, steps, channels))


@pytest.mark.parametrize('pool', ['mean', 'cls', 'map'])
def test_timeseries_padding_mask_invariance(pool):
  enc = build_encoder('timeseries', 'mu', width=32, num_heads=2, channels=3,
                      max_len=32, stem_stride=4, pool=pool)
  x = _series()
  lengths = jnp.array([24, 13])
  mask = jnp.arange(24)[None] < lengths[:, None]
  variables = _init(enc, x, mask)
  run = jax.jit(enc.apply)
  feats = run(variables, x, mask)
  assert feats.shape == (2, 32) and feats.dtype == jnp.float32
  # Rewriting padded steps changes nothing...
  noise = _series(seed=1) * 100
  padded = jnp.where(mask[..., None], x, noise)
  np.testing.assert_allclose(run(variables, padded, mask), feats, atol=1e-5)
  # ...rewriting a real step does.
  moved = run(variables, x.at[1, 5].add(1.0), mask)
  assert not np.allclose(moved[1], feats[1], atol=1e-4)
  # No mask means every step is real.
  np.testing.assert_allclose(run(variables, x, jnp.ones((2, 24), bool))[0],
                             feats[0], atol=1e-5)


def test_timeseries_scan_matches_plain():
  common = dict(width=32, num_heads=2, channels=3, max_len=32, depth=2)
  plain = build_encoder('timeseries', 'mu', **common)
  x = _series()
  mask = jnp.arange(24)[None] < jnp.array([[24], [10]])
  variables = _init(plain, x, mask)
  params = dict(variables['params'])
  encoder = dict(params['encoder'])
  blocks = [encoder.pop(f'block_{i}') for i in range(2)]
  encoder['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  params['encoder'] = encoder
  scanned = build_encoder('timeseries', 'mu', scan_layers=True, remat=True,
                          **common)
  run = jax.jit(lambda v, s: (plain.apply(v, x, mask),
                              scanned.apply(s, x, mask)))
  want, got = run(variables, {'params': params})
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_timeseries_bad_inputs():
  enc = build_encoder('timeseries', 'mu', width=32, num_heads=2, channels=3,
                      max_len=32)
  x = _series()
  with pytest.raises(ValueError, match='channels=3'):
    enc.init(KEY, x[..., :2])
  with pytest.raises(ValueError, match=r'\[B, T, C\]'):
    enc.init(KEY, x[0])
  with pytest.raises(ValueError, match='max_len=32'):
    enc.init(KEY, jnp.zeros((1, 33, 3)))
  with pytest.raises(ValueError, match='mask must be bool'):
    enc.init(KEY, x, jnp.ones((2, 23), bool))
  with pytest.raises(ValueError, match='mask must be bool'):
    enc.init(KEY, x, jnp.ones((2, 24), jnp.int32))
