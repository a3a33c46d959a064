"""Schedules (`mmjax.schedules`) against their formulas, and their config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import schedules


def _values(config, steps):
  fn = schedules.build(config)
  return np.array([float(fn(t)) for t in steps])


def test_constant_and_plain_number():
  np.testing.assert_allclose(_values({"shape": "constant", "value": 0.3}, [0, 7, 10**6]),
                             0.3, rtol=1e-7)
  np.testing.assert_allclose(_values(2.5, [0, 99]), 2.5)
  assert float(schedules.value_at(2.5, None)) == 2.5


def test_linear_against_formula():
  config = {"shape": "linear", "init": 0.2, "end": 1.0, "steps": 40, "begin": 10}
  steps = [0, 10, 15, 30, 50, 51, 500]
  expected = [0.2 + 0.8 * min(max((t - 10) / 40, 0.0), 1.0) for t in steps]
  np.testing.assert_allclose(_values(config, steps), expected, rtol=1e-6)
  assert schedules.final_step(config) == 50
  np.testing.assert_allclose(schedules.value_at(config, None), 1.0)
  jump = {"shape": "linear", "init": 0.0, "end": 3.0, "steps": 0, "begin": 5}
  np.testing.assert_allclose(_values(jump, [4, 5, 6]), [0.0, 3.0, 3.0])


def test_warmup_cosine_against_formula():
  config = {"shape": "warmup_cosine", "init": 0.0, "peak": 1.0, "warmup_steps": 10,
            "decay_steps": 110, "end": 0.1}

  def direct(t):
    if t < 10:
      return t / 10
    u = min(t - 10, 100) / 100
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u))

  steps = [0, 5, 10, 35, 60, 109, 110, 300]
  np.testing.assert_allclose(_values(config, steps), [direct(t) for t in steps],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(schedules.value_at(config, None), 0.1, rtol=1e-6)


def _aecf_direct(t, value, free, ramp, total, fraction):
  """The authors' `_lambda_dyn`, written out with the epoch replaced by the step."""
  if t < free:
    return 0.0
  lam = value * min(1.0, (t - free) / max(1, ramp))
  start = int((1 - fraction) * total)
  if t >= start:
    lam *= 0.5 * (1 + math.cos(math.pi * (t - start) / max(1, total - start)))
  return lam


@pytest.mark.parametrize("free,ramp,total,fraction", [
    (0, 100, 600, 0.1), (20, 50, 400, 0.1), (0, 0, 100, 0.25), (50, 600, 600, 0.1)])
def test_aecf_against_the_authors_formula(free, ramp, total, fraction):
  config = {"shape": "aecf", "value": 0.1, "free_steps": free, "ramp_steps": ramp,
            "total_steps": total, "decay_fraction": fraction}
  steps = sorted({0, 1, free, free + 1, free + ramp // 2, free + ramp, total // 2,
                  int((1 - fraction) * total), int((1 - fraction) * total) + 7,
                  total - 1, total})
  steps = [t for t in steps if t <= total]   # the authors never evaluate past the end
  expected = [_aecf_direct(t, 0.1, free, ramp, total, fraction) for t in steps]
  np.testing.assert_allclose(_values(config, steps), expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(schedules.value_at(config, None), 0.0, atol=1e-8)
  np.testing.assert_allclose(_values(config, [total + 1, 2 * total + ramp]), 0.0, atol=1e-8)


def test_schedules_take_traced_steps():
  config = {"shape": "aecf", "value": 0.1, "ramp_steps": 10, "total_steps": 100}
  fn = jax.jit(lambda t: schedules.value_at(config, t))
  np.testing.assert_allclose(fn(jnp.int32(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(fn(jnp.int32(95)),
                             _aecf_direct(95, 0.1, 0, 10, 100, 0.1), rtol=1e-5)


def test_sorted_pairs_are_accepted():
  pairs = (("end", 1.0), ("init", 0.0), ("shape", "linear"), ("steps", 4))
  np.testing.assert_allclose(_values(pairs, [2]), [0.5])


def test_unknown_shape_is_an_error_listing_the_shapes():
  with pytest.raises(ValueError, match=r"gated.entropy_coeff: unknown schedule shape "
                     r"'cosine'; valid shapes: \['aecf', 'constant', 'linear', "
                     r"'warmup_cosine'\]"):
    schedules.build({"shape": "cosine", "value": 1.0}, "gated.entropy_coeff")
  with pytest.raises(ValueError, match=r"has no 'shape'; valid shapes"):
    schedules.build({"value": 1.0})
  with pytest.raises(ValueError, match="must be a number or a schedule mapping"):
    schedules.build("linear")


def test_field_errors_name_the_field_and_list_the_shape_fields():
  with pytest.raises(ValueError, match=r"schedule shape 'linear' has no field\(s\) "
                     r"\['value'\]; its fields are \['shape', 'init', 'end', 'steps', "
                     r"'begin'\]"):
    schedules.build({"shape": "linear", "init": 0, "end": 1, "steps": 3, "value": 1})
  with pytest.raises(ValueError, match=r"schedule shape 'aecf' needs field\(s\) "
                     r"\['total_steps'\]"):
    schedules.build({"shape": "aecf", "value": 0.1, "ramp_steps": 5})
  with pytest.raises(ValueError, match=r"x.steps must be a whole number of steps >= 0"):
    schedules.build({"shape": "linear", "init": 0, "end": 1, "steps": -3}, "x")
  with pytest.raises(ValueError, match=r"decay_fraction must be in \[0, 1\]"):
    schedules.build({"shape": "aecf", "value": 0.1, "ramp_steps": 5, "total_steps": 9,
                     "decay_fraction": 1.5})
  with pytest.raises(ValueError, match=r"x.value must be a number, got 'a'"):
    schedules.build({"shape": "constant", "value": "a"}, "x")
  with pytest.raises(ValueError, match="must be >= warmup_steps"):
    schedules.build({"shape": "warmup_cosine", "init": 0, "peak": 1, "warmup_steps": 10,
                     "decay_steps": 5})


def test_train_step_hands_its_step_to_the_model_and_the_objective(mesh1):
  import flax.linen as nn
  import optax
  from mmjax.models.model import ModelOutput
  from mmjax.train import step as step_lib

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, batch, *, train=False, step=None):
      w = self.param("w", nn.initializers.zeros, ())
      seen = -1.0 if step is None else jnp.asarray(step, jnp.float32)
      return ModelOutput(embeddings={}, features={}, logit_scale=w + seen)

  def objective(output, batch, objective_config, *, axis_name=None, step=None):
    loss = jax.lax.pmean(jnp.mean(batch["x"]), axis_name) * output.logit_scale
    return loss, {"objective_step": step}

  model = Probe()
  batch = {"x": np.ones((2, 1), np.float32)}
  state = step_lib.create_train_state(model, optax.sgd(0.0), batch, jax.random.key(0),
                                      mesh1)
  train_step = step_lib.make_train_step(model, objective, None, mesh1, donate=False)
  for expected in (0, 1, 2):
    state, metrics = train_step(state, batch, jax.random.key(1))
    assert float(metrics["logit_scale"]) == expected      # the model saw state.step
    assert int(metrics["objective_step"]) == expected
  apply = step_lib.make_apply_fn(model)
  assert float(apply(state.params, batch).logit_scale) == -1.0   # eval: no step
