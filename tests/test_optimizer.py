"""The logit scale: exp(t) in the forward pass, t clamped by the optimizer."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import align, config_lib, models
from mmjax.train import optimizer as opt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_CAP = math.log(100.0)


def _opt_config(lr=0.05):
  c = config_lib.base_config().optimizer
  c.lr, c.warmup_steps, c.min_lr_ratio, c.clip_norm = lr, 0, 1.0, 1e9  # constant lr
  return c


def _params(t):
  return {"logit_scale": jnp.float32(t), "w": jnp.full((2, 3), 0.5, jnp.float32)}


def _grads(dt):
  return {"logit_scale": jnp.float32(dt), "w": jnp.full((2, 3), 0.1, jnp.float32)}


def test_clamp_holds_t_at_the_cap_and_lets_it_come_back_down():
  clamped = opt_lib.make_optimizer(_opt_config(), 100)           # CLIP default: 100
  free = opt_lib.make_optimizer(_opt_config(), 100, max_logit_scale=None)
  params = _params(LOG_CAP - 0.12)
  state = clamped.init(params)
  update = jax.jit(clamped.update)
  free_update = jax.jit(free.update)
  trajectory = []
  # A gradient that pushes t up for 6 steps, then one that pulls it down for 10.
  for dt in [-1.0] * 6 + [1.0] * 10:
    grads = _grads(dt)
    updates, new_state = update(grads, state, params)
    # The clamp is stateless and acts last: the unclamped update, then a clip.
    free_updates, free_state = free_update(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, new_state, free_state)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        new_params["logit_scale"],
        np.clip(params["logit_scale"] + free_updates["logit_scale"], 0.0, LOG_CAP),
        rtol=0, atol=1e-6)
    np.testing.assert_array_equal(new_params["w"],
                                  optax.apply_updates(params, free_updates)["w"])
    params, state = new_params, new_state
    trajectory.append(float(params["logit_scale"]))
  up, down = trajectory[:6], trajectory[6:]
  assert up[0] < LOG_CAP                          # the first step does not reach it
  assert all(t == pytest.approx(LOG_CAP, abs=1e-6) for t in up[3:])   # held there
  assert all(t <= LOG_CAP + 1e-6 for t in trajectory)
  # Adam's moments remember the push up; once the pull wins, t leaves the cap and
  # keeps falling (no dead gradient).
  assert down[-1] < LOG_CAP - 0.05
  assert all(b < a for a, b in zip(down[-3:], down[-2:]))


def test_without_clamp_t_goes_past_the_cap():
  free = opt_lib.make_optimizer(_opt_config(), 100, max_logit_scale=None)
  params = _params(LOG_CAP - 0.12)
  state = free.init(params)
  for _ in range(6):
    updates, state = free.update(_grads(-1.0), state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["logit_scale"]) > LOG_CAP + 0.1


def test_clamp_lower_end_is_zero():
  tx = opt_lib.make_optimizer(_opt_config(lr=0.3), 100, max_logit_scale=50.0)
  params = _params(0.2)
  state = tx.init(params)
  for _ in range(4):
    updates, state = tx.update(_grads(1.0), state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["logit_scale"]) == pytest.approx(0.0, abs=1e-7)
  assert float(params["logit_scale"]) >= 0.0


def test_state_is_the_same_with_and_without_clamp():
  """Checkpoints saved before the clamp (or with it off) restore: same state tree."""
  params = _params(1.0)
  clamped = opt_lib.make_optimizer(_opt_config(), 10).init(params)
  free = opt_lib.make_optimizer(_opt_config(), 10, max_logit_scale=None).init(params)
  assert jax.tree.structure(clamped) == jax.tree.structure(free)


def test_forward_uses_exp_t_without_cap_and_keeps_its_gradient():
  model = models.MultimodalModel(
      encoders={"table": dict(kind="mlp", variant="mu", width=8, depth=1, norm="none")},
      embed_dim=4)
  batch = {"table": jnp.ones((2, 5), jnp.float32)}
  params = model.init(jax.random.key(0), batch)["params"]
  np.testing.assert_allclose(params["logit_scale"], align.CLIP_INIT_LOGIT_SCALE,
                             rtol=1e-6)

  def scale(t):
    return model.apply({"params": {**params, "logit_scale": t}}, batch).logit_scale

  t = jnp.float32(LOG_CAP + 1.0)
  np.testing.assert_allclose(scale(t), math.exp(LOG_CAP + 1.0), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(scale)(t), math.exp(LOG_CAP + 1.0), rtol=1e-6)


def test_config_defaults_clip_capped_siglip_not():
  base = config_lib.base_config()
  assert base.model.max_logit_scale == align.MAX_LOGIT_SCALE == 100.0
  assert base.model.logit_scale_init == align.CLIP_INIT_LOGIT_SCALE
  siglip = config_lib.load_config(os.path.join(REPO, "configs", "siglip.py"))
  assert siglip.model.max_logit_scale is None
  assert siglip.model.logit_scale_init == pytest.approx(math.log(10.0))
  base.model.max_logit_scale = None                 # the field takes None and back
  base.model.max_logit_scale = 50.0


@pytest.mark.parametrize("cap, match", [
    (1.0, "finite number > 1"), (0.5, "finite number > 1"), (-3.0, "finite number > 1"),
    (math.inf, "finite number > 1"), ("100", "number > 1 or None"),
    (True, "number > 1 or None"),
])
def test_bad_max_logit_scale_raises(cap, match):
  with pytest.raises(ValueError, match=r"model\.max_logit_scale must be a " + match):
    opt_lib.make_optimizer(_opt_config(), 10, max_logit_scale=cap)


def test_clamp_needs_params_with_a_logit_scale_leaf():
  tx = opt_lib.make_optimizer(_opt_config(), 10)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"no top-level leaf 'logit_scale' \(top level: \['w'\]\)"):
    tx.update({"w": jnp.ones((2, 2))}, state, params)
  clamp = opt_lib.clamp_logit_scale(100.0)
  with pytest.raises(ValueError, match=r"clamp_param\('logit_scale'\) needs the params"):
    clamp.update(_grads(1.0), clamp.init(None))
  with pytest.raises(ValueError, match="low 2.0 > high 1.0"):
    opt_lib.clamp_param("logit_scale", 2.0, 1.0)
