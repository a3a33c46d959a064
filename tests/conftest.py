"""Test setup: 8 simulated CPU devices, set before JAX is imported, and one compilation
cache for the whole session.

The cache (JAX's persistent compilation cache, in a temporary folder removed at exit)
lets the many runs of the same tiny configs, in this process and in the subprocesses
the CLI and launcher tests start (they inherit the environment), compile each program
once. A cached executable is the one the compiler produced, so results are unchanged.
"""
import atexit
import os
import shutil
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

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
