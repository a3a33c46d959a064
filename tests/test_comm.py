"""CoMM (mmjax.align.comm): its loss against a direct formula, over devices as on one,
the configs it refuses, and the factor-probe targets of the comparison."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import config_lib
from mmjax.align import comm
from mmjax.data import world as world_lib
from mmjax.evals.evaluators import factors

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _direct(joint, scale):
  z = joint / np.linalg.norm(joint, axis=1, keepdims=True)
  a, b = z[0::2], z[1::2]
  logits = scale * a @ b.T

  def ce(l):
    l = l - l.max(1, keepdims=True)
    return -np.mean(np.diag(l) - np.log(np.exp(l).sum(1)))

  return 0.5 * (ce(logits) + ce(logits.T))


def test_comm_loss_against_a_direct_formula_and_over_devices(mesh8):
  joint = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
  loss, metrics = comm.comm_loss(jnp.asarray(joint), logit_scale=5.0)
  np.testing.assert_allclose(float(loss), _direct(joint.astype(np.float64), 5.0), rtol=1e-4)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  sharded = jax.jit(jax.shard_map(
      functools.partial(lambda x: comm.comm_loss(x, logit_scale=5.0, axis_name="data")[0]),
      mesh=mesh8, in_specs=P("data"), out_specs=P()))(jnp.asarray(joint))
  np.testing.assert_allclose(float(sharded), float(loss), rtol=1e-5)
  with pytest.raises(ValueError, match="b even"):
    comm.comm_loss(jnp.zeros((3, 4)), logit_scale=1.0)


def test_comm_without_views_or_fusion_is_an_error_saying_what_to_set():
  c = config_lib.load_config(os.path.join(CONFIGS, "comm_world.py"), "comm,runlocal")
  comm.check_config(c, world_lib.FACTOR_NAMES)         # the config's views: fine
  c.data.group_batches.size = 0
  with pytest.raises(ValueError, match="none are configured .*group_batches.size = 2"):
    comm.check_config(c, world_lib.FACTOR_NAMES)
  c = config_lib.load_config(os.path.join(CONFIGS, "comm_world.py"), "comm,runlocal")
  c.data.group_batches.share = ("shape",)
  with pytest.raises(ValueError, match="augmented views"):
    comm.check_config(c, world_lib.FACTOR_NAMES)
  c.model.fusion = None
  with pytest.raises(ValueError, match="set model.fusion"):
    comm.check_config(c, world_lib.FACTOR_NAMES)


def test_factor_targets():
  f = np.array([[0, 5, 2, 1], [4, 1, 1, 8]])
  np.testing.assert_array_equal(factors.target_values(f, "colour+size%3"), [1, 2])
  np.testing.assert_array_equal(factors.target_values(f, "position"), [1, 8])
  for bad in ("colour+size", "hue", "shape%1"):
    with pytest.raises(ValueError, match="targets"):
      factors.parse_target(bad)
