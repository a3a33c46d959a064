"""Metrics: `metrics.jsonl` (one JSON object per line), TensorBoard events, and a
progress bar (plain log lines when stderr is not a terminal or `CI` is set).

Only process 0 writes; every process may call these.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Mapping

import jax
import numpy as np


def tensorboard_tag(name: str) -> str:
  """A metric name as a TensorBoard tag (which allows only [-/\\w.]):
  'eval/retrieval/image->text/R@1' -> 'eval/retrieval/image_to_text/R1'."""
  name = name.replace("->", "_to_").replace("+", "_and_").replace("@", "")
  return re.sub(r"[^-/\w.]", "_", name)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else None


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` to WORKDIR/metrics.jsonl and TensorBoard.

  Each row is one `write` of a whole line to a file opened for appending, so a row is
  on disk whole or (a crash mid-write) as a partial last line that `read_metrics`
  ignores and `truncate_metrics` removes.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is not None:
        row[k] = s
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
      os.close(fd)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(tensorboard_tag(k), v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl; a partial last line (a crash mid-write) is
  left out, a damaged line elsewhere is an error naming it."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):       # no newline after it: the write was cut short
        break
      raise ValueError(f"{path}: line {number} is not a JSON row ({e})") from None
  return rows


def last_metrics(workdir: str) -> dict[str, float]:
  """The latest value of every metric in WORKDIR/metrics.jsonl."""
  out = {}
  for row in read_metrics(workdir):
    out.update({k: v for k, v in row.items() if k != "step"})
  return out


def truncate_metrics(workdir: str, after_step: int):
  """Drops the rows past `after_step`, which a resumed run writes again (all rows,
  when it starts from step 0), so the file is the log of one uninterrupted run.
  Atomic: the kept rows go to a temporary file that replaces the old one."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  rows = [r for r in read_metrics(workdir) if r["step"] <= after_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


class Progress:
  """Step, loss, steps/s and ETA: a tqdm bar on a terminal, log lines otherwise."""

  def __init__(self, total_steps: int, start_step: int, *, every: int):
    self.total, self.every = total_steps, max(1, every)
    self.active = jax.process_index() == 0
    interactive = sys.stderr.isatty() and not os.environ.get("CI")
    self._bar = None
    if self.active and interactive:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int, loss: float | None = None, steps_per_second: float | None = None):
    if not self.active:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}")
      return
    if loss is None:
      return
    rate = steps_per_second or 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  "
          f"ETA {_fmt_seconds(eta)}", flush=True)

  def write(self, message: str):
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _fmt_seconds(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
