"""Compares two runs of one config: `train/loss` step by step and the final parameters.

  python launch/compare_runs.py WORKDIR_A WORKDIR_B [--loss_tolerance=1e-6]
      [--param_tolerance=1e-5]

Use it to check that a run on another layout (2 processes x 4 devices against
1 x 8, or a preempted and resumed run against an uninterrupted one) trains the same
model. Prints the largest loss difference and the largest parameter difference at the
last checkpoint step both runs have; exits 1 when either exceeds its tolerance or the
runs logged different steps. Summing gradients in another order (across processes
instead of within one) changes the last bits of a step, and Adam's normalised update
can carry such a difference in a near-zero gradient up to the learning rate, hence a
looser default for parameters than for losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


def losses(workdir: str) -> dict[int, float]:
  """step -> train/loss from WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def load_params(workdir: str, step: int) -> dict:
  """The params saved at `step`, as host numpy arrays, whatever layout saved them."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  # Restore onto one local device: the saving run's device layout does not matter.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        tree)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target)["params"])


def _param_names(params) -> set[str]:
  return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def compare(workdir_a: str, workdir_b: str) -> dict:
  """{'steps', 'max_loss_diff', 'param_step', 'max_param_diff', 'max_param'} of two
  runs (`max_param`: the largest |parameter| of run A, for scale).

  Raises:
    ValueError: the runs logged different steps, have no common checkpoint, or
      their params differ in structure or shape.
  """
  la, lb = losses(workdir_a), losses(workdir_b)
  if not la:
    raise ValueError(f"{workdir_a} logged no train/loss (run with --config.log_every_steps=1 "
                     f"to compare every step)")
  if sorted(la) != sorted(lb):
    raise ValueError(f"the runs logged different steps: {sorted(la)} vs {sorted(lb)}")
  common = sorted(set(checkpoint_steps(workdir_a)) & set(checkpoint_steps(workdir_b)))
  if not common:
    raise ValueError(f"{workdir_a} and {workdir_b} have no checkpoint step in common")
  step = common[-1]
  pa, pb = load_params(workdir_a, step), load_params(workdir_b, step)
  if jax.tree.structure(pa) != jax.tree.structure(pb):
    names_a, names_b = _param_names(pa), _param_names(pb)
    raise ValueError(f"the runs' params differ in structure (different models?): only in "
                     f"{workdir_a}: {sorted(names_a - names_b)[:5]}; only in {workdir_b}: "
                     f"{sorted(names_b - names_a)[:5]}")
  diffs, scale = [], 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
    if a.shape != b.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)}: shape {a.shape} vs {b.shape}")
    diffs.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)),
                              initial=0.0)))
    scale = max(scale, float(np.max(np.abs(a), initial=0.0)))
  return {
      "steps": sorted(la),
      "max_loss_diff": max((abs(la[s] - lb[s]) for s in la), default=0.0),
      "param_step": step,
      "max_param_diff": max(diffs, default=0.0),
      "max_param": scale,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir_a")
  parser.add_argument("workdir_b")
  parser.add_argument("--loss_tolerance", type=float, default=1e-6)
  parser.add_argument("--param_tolerance", type=float, default=1e-5)
  args = parser.parse_args(argv)
  result = compare(args.workdir_a, args.workdir_b)
  steps = result["steps"]
  print(f"steps {steps[0]}..{steps[-1]} ({len(steps)} logged): max |loss difference| "
        f"{result['max_loss_diff']:.3g}")
  print(f"params at step {result['param_step']}: max |difference| "
        f"{result['max_param_diff']:.3g} (largest |param| {result['max_param']:.3g})")
  ok = (result["max_loss_diff"] <= args.loss_tolerance and
        result["max_param_diff"] <= args.param_tolerance)
  print("same" if ok else "DIFFERENT", f"within loss tolerance {args.loss_tolerance:g} and "
        f"param tolerance {args.param_tolerance:g}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
