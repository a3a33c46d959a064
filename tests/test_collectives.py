"""mmjax.collectives: device-order sums (values, gradients, types). The train step with
`deterministic_reductions` is checked in tests/test_train.py (1 vs 8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import collectives


def _sharded(mesh, fn, in_specs, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def _left_to_right(rows):
  total = rows[0].copy()
  for row in rows[1:]:
    total = total + row           # float32, one add at a time
  return total


def test_fixed_order_psum_is_the_left_to_right_float32_sum(mesh8):
  # Values whose float32 sum depends on the order of the adds.
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((8, 5)) * 10.0 ** rng.integers(-4, 8, (8, 5))).astype(np.float32)

  def body(x):
    with collectives.fixed_order():
      return collectives.psum(x[0], "data")

  got = _sharded(mesh8, body, P("data"), P())(x)
  np.testing.assert_array_equal(np.asarray(got), _left_to_right(x))
  # pmean is that sum over n; outside fixed_order these are jax.lax's collectives.
  mean = _sharded(mesh8, lambda x: collectives.pmean(x[0], "data"), P("data"), P())(x)
  np.testing.assert_allclose(np.asarray(mean), x.mean(0), rtol=1e-5, atol=1e-3)


def test_fixed_order_sums_integers_and_gathers_exactly(mesh8):
  counts = np.arange(16, dtype=np.int32).reshape(8, 2)

  def body(c):
    with collectives.fixed_order():
      return collectives.psum(c[0], "data"), collectives.all_gather(c, "data")

  # The gathered array is per-device (varying): one copy per device, stacked.
  total, gathered = _sharded(mesh8, body, P("data"), (P(), P("data")))(counts)
  np.testing.assert_array_equal(np.asarray(total), counts.sum(0))
  np.testing.assert_array_equal(np.asarray(gathered).reshape(8, 8, 2), np.stack([counts] * 8))


@pytest.mark.parametrize("axis", [0, 1])
def test_fixed_order_gradients_equal_autodiff_through_the_lax_collectives(mesh8, axis):
  """The loss sum_d f(all_gather(x)) d-th block: the gradient of the gather (a sum over
  devices of their cotangents) and of the psum of the per-device losses."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 6) if axis == 0 else (3, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, 6) if axis == 0 else (3, 3)), jnp.float32)

  def make(fixed):
    def body(w, x):
      with collectives.fixed_order(fixed):
        everything = collectives.all_gather(x, "data", axis=axis)
        mine = jax.lax.axis_index("data").astype(jnp.float32)
        local = jnp.sum(jnp.tanh(everything @ w if axis == 0 else w @ everything) * x.sum()
                        ) * (1.0 + mine)
        return collectives.psum(local, "data")
    spec = P("data") if axis == 0 else P(None, "data")
    return _sharded(mesh8, jax.grad(body, argnums=(0, 1)), (P(), spec), (P(), spec))

  fixed_w, fixed_x = make(True)(w, x)
  plain_w, plain_x = make(False)(w, x)
  np.testing.assert_allclose(fixed_w, plain_w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fixed_x, plain_x, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(fixed_x).sum()) > 0


def test_fixed_order_is_read_at_trace_time_and_restored():
  assert not collectives.fixed_order_enabled()
  with collectives.fixed_order():
    assert collectives.fixed_order_enabled()
    with collectives.fixed_order(False):
      assert not collectives.fixed_order_enabled()
    assert collectives.fixed_order_enabled()
  assert not collectives.fixed_order_enabled()


def test_fixed_order_over_a_tuple_of_axes():
  """Over ('data', 'fsdp') on a 2 x 4 mesh: the sum in flat device order, and the
  gradient of a parameter split over 'fsdp' (replicated over 'data') through it, as
  jax.lax.psum's."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  axes = ("data", "fsdp")
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((8, 5)) * 10.0 ** rng.integers(-4, 8, (8, 5))).astype(np.float32)

  def total(x):
    with collectives.fixed_order():
      return collectives.psum(x[0], axes)

  got = _sharded(mesh, total, P(axes), P())(x)
  np.testing.assert_array_equal(np.asarray(got), _left_to_right(x))

  w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)     # split over fsdp only

  def make(fixed):
    def loss(w, x):
      with collectives.fixed_order(fixed):
        local = jnp.sum(jnp.tanh(x[:, :1] * w)) * (
            1.0 + jax.lax.axis_index(axes).astype(jnp.float32))
        return collectives.psum(local, axes)
    return _sharded(mesh, jax.grad(loss), (P("fsdp"), P(axes)), P("fsdp"))

  np.testing.assert_allclose(make(True)(w, x), make(False)(w, x), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(make(True)(w, x)).sum()) > 0
