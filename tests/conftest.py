"""Test setup: 8 simulated CPU devices, set before JAX is imported, and one compilation
cache for the whole session.

The cache (JAX's persistent compilation cache, in a temporary folder removed at exit)
lets the many runs of the same tiny configs, in this process and in the subprocesses
the CLI and launcher tests start (they inherit the environment), compile each program
once. A cached executable is the one the compiler produced, so results are unchanged.

Most of the suite's time is XLA:CPU compiling small programs, and most of that is LLVM
optimising the generated code, which these tiny runs hardly benefit from: the tests
compile with LLVM's optimisation level 0 and without its expensive passes
(`COMPILE_FLAGS`). HLO passes (fusion, layout, buffer assignment, hence compiled memory
figures) are untouched. The subprocesses the CLI and launcher tests start run on one
device (their own `XLA_FLAGS`), with `MMJAX_TEST_CHILD_XLA_FLAGS`, these same flags.
"""
import atexit
import os
import shutil
import tempfile

COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
  flags += " " + COMPILE_FLAGS
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("MMJAX_TEST_CHILD_XLA_FLAGS", COMPILE_FLAGS)
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
