"""Step-dependent hyperparameters: a schedule is a function `step -> scalar` built
from a config mapping with a `shape` field.

One mechanism for every value that changes during training (loss coefficients,
masking rates): a module keeps the mapping as a config field and evaluates it at
the step the train step hands in (`state.step`, the number of updates already
applied: 0 on the first step).

  {'shape': 'constant', 'value': v}
      v at every step.
  {'shape': 'linear', 'init': a, 'end': b, 'steps': n, 'begin': s0 = 0}
      a until s0, then linearly to b over n steps, then b:
      a + (b - a) * clip((t - s0) / n, 0, 1).
  {'shape': 'warmup_cosine', 'init': a, 'peak': p, 'warmup_steps': w,
   'decay_steps': n, 'end': e = 0}
      linear a -> p over w steps, then cosine p -> e until step n (n counts the
      warm-up too), then e (optax.warmup_cosine_decay_schedule).
  {'shape': 'aecf', 'value': v, 'free_steps': f = 0, 'ramp_steps': r,
   'total_steps': T, 'decay_fraction': d = 0.1}
      AECF's entropy coefficient: 0 before f, a linear ramp to v over r steps,
      flat, and a cosine decay to 0 over the last fraction d of training:
        lam(t) = 0                                         t < f
               = v * min(1, (t - f) / max(1, r)) * c(t)     t >= f
        c(t)   = 1 before D = int((1 - d) * T), then
                 0.5 * (1 + cos(pi * min(1, (t - D) / max(1, T - D)))).
      The ramp and the decay multiply, as in the authors' code, so a ramp that
      has not finished when the decay starts is decayed from where it is. After
      T the value stays 0 (the authors' code never evaluates past its last epoch).

A plain number is accepted wherever a schedule is, as a constant. The value
without a step (`value_at(config, None)`, what eval-mode forward passes use) is
the schedule's final value, the one it keeps after `final_step(config)`.

Every builder is optax's (constant_schedule, linear_schedule, join_schedules,
cosine_decay_schedule, warmup_cosine_decay_schedule); the functions accept int
or traced int steps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]

# shape -> (required fields, optional fields with defaults)
SHAPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "constant": (("value",), {}),
    "linear": (("init", "end", "steps"), {"begin": 0}),
    "warmup_cosine": (("init", "peak", "warmup_steps", "decay_steps"), {"end": 0.0}),
    "aecf": (("value", "ramp_steps", "total_steps"),
             {"free_steps": 0, "decay_fraction": 0.1}),
}
_STEP_FIELDS = ("steps", "begin", "warmup_steps", "decay_steps", "free_steps",
                "ramp_steps", "total_steps")


def _as_dict(config: Any, name: str) -> dict[str, Any]:
  """A mapping, a ConfigDict, or sorted (key, value) pairs (how fusion configs
  are stored on a module) -> a plain dict with a 'shape'."""
  if isinstance(config, Mapping) or hasattr(config, "items"):
    out = dict(config.items())
  elif (isinstance(config, (tuple, list)) and config
        and all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                for p in config)):
    out = dict(config)
  else:
    raise ValueError(f"{name} must be a number or a schedule mapping with a 'shape' "
                     f"(one of {sorted(SHAPES)}), got {config!r}")
  if "shape" not in out:
    raise ValueError(f"{name} has no 'shape'; valid shapes: {sorted(SHAPES)} "
                     f"(got fields {sorted(out)})")
  return out


def is_schedule(config: Any) -> bool:
  """True for a number or anything `build` would try to read as a schedule."""
  return not isinstance(config, bool) and (
      isinstance(config, (int, float)) or isinstance(config, (Mapping, tuple, list))
      or hasattr(config, "items"))


def fields(config: Any, name: str = "schedule") -> dict[str, Any]:
  """The checked fields of a schedule config, defaults filled in.

  Raises:
    ValueError: an unknown shape (listing the valid ones), a field the shape does
      not take or a missing required one (listing the shape's fields), or a bad
      value (a negative or non-integer step count, decay_fraction outside [0, 1]).
  """
  if isinstance(config, (int, float)) and not isinstance(config, bool):
    return {"shape": "constant", "value": float(config)}
  config = _as_dict(config, name)
  shape = config.pop("shape")
  if shape not in SHAPES:
    raise ValueError(f"{name}: unknown schedule shape {shape!r}; valid shapes: "
                     f"{sorted(SHAPES)}")
  required, optional = SHAPES[shape]
  valid = ["shape", *required, *optional]
  unknown = sorted(set(config) - set(valid))
  if unknown:
    raise ValueError(f"{name}: schedule shape {shape!r} has no field(s) {unknown}; "
                     f"its fields are {valid}")
  missing = [f for f in required if f not in config]
  if missing:
    raise ValueError(f"{name}: schedule shape {shape!r} needs field(s) {missing}; "
                     f"its fields are {valid}")
  out = {"shape": shape, **optional, **config}
  for key, value in out.items():
    if key == "shape":
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{name}.{key} must be a number, got {value!r}")
    if key in _STEP_FIELDS and (value < 0 or int(value) != value):
      raise ValueError(f"{name}.{key} must be a whole number of steps >= 0, got {value!r}")
  if shape == "aecf" and not 0.0 <= out["decay_fraction"] <= 1.0:
    raise ValueError(f"{name}.decay_fraction must be in [0, 1], got {out['decay_fraction']}")
  if shape == "warmup_cosine" and out["decay_steps"] < out["warmup_steps"]:
    raise ValueError(f"{name}: decay_steps={out['decay_steps']} counts the warm-up and "
                     f"must be >= warmup_steps={out['warmup_steps']}")
  return out


def check(value: Any, name: str, upper: float | None = None) -> None:
  """A number in [0, upper) (or >= 0 without `upper`), or a valid schedule config.

  Raises:
    ValueError: naming `name`, the bound and the value, or the schedule's fault.
  """
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if value < 0 or (upper is not None and value >= upper):
      bound = f"in [0, {upper:g})" if upper is not None else ">= 0"
      raise ValueError(f"{name} must be {bound} (or a schedule), got {value}")
    return
  fields(value, name)


def final_step(config: Any, name: str = "schedule") -> int:
  """The step from which the schedule stays at its final value."""
  f = fields(config, name)
  shape = f["shape"]
  if shape == "constant":
    return 0
  if shape == "linear":
    return int(f["begin"] + f["steps"])
  if shape == "warmup_cosine":
    return int(f["decay_steps"])
  return int(max(f["total_steps"], f["free_steps"] + max(1, f["ramp_steps"])))


def aecf_decay_start(total_steps: int, decay_fraction: float) -> int:
  """First step of AECF's cosine decay, int((1 - decay_fraction) * total_steps)."""
  return int((1.0 - decay_fraction) * total_steps)


def build(config: Any, name: str = "schedule") -> Schedule:
  """The schedule `step -> scalar` of a config (see the module doc)."""
  f = fields(config, name)
  shape = f["shape"]
  if shape == "constant":
    return optax.constant_schedule(f["value"])
  if shape == "linear":
    if f["steps"] == 0:   # a jump at `begin`
      return optax.join_schedules([optax.constant_schedule(f["init"]),
                                   optax.constant_schedule(f["end"])], [int(f["begin"])])
    return optax.linear_schedule(f["init"], f["end"], int(f["steps"]),
                                 transition_begin=int(f["begin"]))
  if shape == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        f["init"], f["peak"], int(f["warmup_steps"]), int(f["decay_steps"]), f["end"])
  free, total = int(f["free_steps"]), int(f["total_steps"])
  ramp = optax.join_schedules(
      [optax.constant_schedule(0.0),
       optax.linear_schedule(0.0, f["value"], max(1, int(f["ramp_steps"])))], [free])
  start = aecf_decay_start(total, f["decay_fraction"])
  decay = optax.join_schedules(
      [optax.constant_schedule(1.0),
       optax.cosine_decay_schedule(1.0, max(1, total - start))], [start])
  return lambda step: ramp(step) * decay(step)


def value_at(config: Any, step, name: str = "schedule"):
  """The schedule's value at `step` (an int or int array), a float32 scalar; with
  step=None, its final value (at `final_step`)."""
  if step is None:
    step = final_step(config, name)
  return jnp.asarray(build(config, name)(step), jnp.float32)
