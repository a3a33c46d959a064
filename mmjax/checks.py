"""Range checks for config values, each raised where the config is read.

    check_range("optimizer.lr", c.lr, low=0, low_open=True)
    -> ValueError: optimizer.lr=-1.0 is out of range: it must be > 0

Imports nothing of mmjax, so every room may use it.
"""

from __future__ import annotations

import math
import numbers


def _range_text(low, high, low_open, high_open, integer) -> str:
  kind = "a whole number" if integer else "a number"
  lo = None if low is None else f"{'>' if low_open else '>='} {low}"
  hi = None if high is None else f"{'<' if high_open else '<='} {high}"
  if lo and hi:
    return (f"{kind} in {'(' if low_open else '['}{low}, {high}"
            f"{')' if high_open else ']'}")
  return f"{kind} {lo or hi}" if (lo or hi) else kind


def check_range(where: str, value, *, low=None, high=None, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
  """Raises ValueError naming `where`, `value` and the valid range unless `value` is a
  finite number (an int when `integer`; never a bool) in the range."""
  wanted = _range_text(low, high, low_open, high_open, integer)
  is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not is_number or (integer and not isinstance(value, numbers.Integral)):
    raise ValueError(f"{where}={value!r}: it must be {wanted}")
  bad = not math.isfinite(float(value))
  if low is not None:
    bad |= value <= low if low_open else value < low
  if high is not None:
    bad |= value >= high if high_open else value > high
  if bad:
    raise ValueError(f"{where}={value!r} is out of range: it must be {wanted}")


def check_rate(where: str, value) -> None:
  """A probability: a number in [0, 1]."""
  check_range(where, value, low=0, high=1)


def check_count(where: str, value, *, low: int = 1) -> None:
  """A whole number >= `low` (steps, sizes, counts)."""
  check_range(where, value, low=low, integer=True)
