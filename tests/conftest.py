"""Test setup: 8 simulated CPU devices, set before JAX is imported."""
import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D mesh over all 8 simulated devices, axis 'data' (Auto axis type)."""
  assert jax.device_count() == 8, "tests expect 8 simulated devices"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="session")
def mesh1():
  """A 1-device mesh with the same axis name, for 1-vs-8 comparisons."""
  return jax.sharding.Mesh(jax.devices()[:1], ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
