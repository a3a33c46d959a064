"""Checkpoints with orbax: train state + data-iterator state + the config, together.

Orbax writes each step to a temporary directory and renames it when complete, so a
run killed mid-save leaves the last finished step intact. A workdir whose checkpoints
were written by an incompatible config is never overwritten: `check_compatible`
names the fields that differ.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

# Subtrees of the config that fix the shapes or meaning of the saved state. Fields
# outside them (total_steps, lr, eval cadence, ...) may change between runs of a workdir.
COMPATIBLE_FIELDS = ("model", "objective.kind", "data.kind", "data.modalities", "batch_size")


def make_manager(workdir: str, *, keep: int = 3, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config_dict,
         *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(config_dict)}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the state (and the iterator, in place) saved at `step`.

  The state is resharded onto `abstract_state`'s shardings, so a run may resume on
  another number of processes or devices. The data iterator is restored from this
  process's own file when the run has as many processes as the one that saved it;
  otherwise from the position every saving process shared (`resharded_data_state`).
  """
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  shared_data_state = None
  if data_iterator is not None:
    own = _data_dir(manager, step) / (
        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if own.exists():
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      shared_data_state = resharded_data_state(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  if shared_data_state is not None:
    data_iterator.set_state(shared_data_state)
    if hasattr(data_iterator, "start_prefetch"):
      data_iterator.start_prefetch()
  return restored["state"]


def _data_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(step) / "data"


def resharded_data_state(manager: ocp.CheckpointManager, step: int) -> dict:
  """The data-iterator state to resume on a different number of processes.

  Process p of n reads global batch s as its part p of every global batch (see
  `mmjax.data.pipeline`), so its iterator position counts global batches and is the
  same on every process; that shared position is valid for any process count.

  Raises:
    ValueError: the step has no iterator state, or the saving processes were at
      different positions (then it resumes only on the process count that saved it).
  """
  files = sorted(_data_dir(manager, step).glob("process_*-of-*.json"))
  if not files:
    raise ValueError(f"checkpoint step {step} in {manager.directory} has no data-iterator "
                     "state to resume from")
  states = {f.name: json.loads(f.read_text()) for f in files}
  distinct = {json.dumps(v, sort_keys=True) for v in states.values()}
  if len(distinct) != 1:
    raise ValueError(f"checkpoint step {step} was saved by {len(files)} processes whose data "
                     f"iterators are at different positions {states}; resume it on "
                     f"{len(files)} processes")
  return json.loads(distinct.pop())


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v, default=str))
  return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       fields=COMPATIBLE_FIELDS) -> list[str]:
  """'field: saved -> current' for every compatibility field that differs."""
  a, b = _flatten(saved), _flatten(current)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == f or key.startswith(f + ".") for f in fields):
      if a.get(key, "<absent>") != b.get(key, "<absent>"):
        diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


class IncompatibleCheckpointError(ValueError):
  pass


def check_compatible(manager, step: int, current_config: Mapping[str, Any], workdir: str):
  diffs = config_differences(saved_config(manager, step), current_config)
  if diffs:
    raise IncompatibleCheckpointError(
        f"the checkpoint at step {step} in {workdir} was written by a different config; "
        f"these fields differ (saved -> now):\n  " + "\n  ".join(diffs) +
        "\nUse another --workdir, or restore the config it was trained with. "
        "Nothing was overwritten.")
