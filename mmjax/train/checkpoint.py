"""Checkpoints with orbax: train state + data-iterator state + the config, together.

Orbax writes each step to a temporary directory and renames it when complete, so a
run killed mid-save leaves the last finished step intact; each step also carries a
manifest of its files' sizes and checksums (`mmjax.train.integrity`). A workdir whose
checkpoints were written by an incompatible config is never overwritten:
`check_compatible` names the fields that differ. `Checkpoints.restore_latest` restores
the newest step that is intact, setting aside the ones that are not (docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax.train import integrity
from mmjax.train import sharding as sharding_lib

# Subtrees of the config that fix the shapes or meaning of the saved state. Fields
# outside them (total_steps, lr, eval cadence, ...) may change between runs of a workdir.
COMPATIBLE_FIELDS = ("model", "objective.kind", "data.kind", "data.modalities", "batch_size")


# Where `restore_latest` moves steps that cannot be restored, so they can be inspected.
SET_ASIDE = "checkpoints_set_aside"


def make_manager(workdir: str, *, keep: int = 3, read_only: bool = False,
                 before_commit: Callable[[], None] | None = None) -> ocp.CheckpointManager:
  """Orbax's manager of WORKDIR/checkpoints; `before_commit` runs in its save thread
  once a step's files are written, before the step directory is committed."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  async_options = (ocp.AsyncOptions(post_finalization_callback=before_commit)
                   if before_commit is not None else None)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only, async_options=async_options)
  return ocp.CheckpointManager(directory, options=options)


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored."""


class Checkpoints:
  """The trainer's checkpoints: saves sealed with a checksum manifest, and a restore
  that falls back past steps that are damaged.

  `save` is asynchronous (orbax's background thread writes the step); `wait` blocks
  until the step in flight is committed, so `latest_step` after `wait` names a
  finished step.
  """

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = os.path.abspath(workdir)
    self._saving: int | None = None
    self.manager = make_manager(workdir, keep=keep, before_commit=self._seal)
    self.directory = epath.Path(self.manager.directory)

  def _seal(self) -> None:
    """Writes the checksum manifest of the step being saved into its temporary
    directory (orbax's save thread calls this before renaming it)."""
    step = self._saving
    if step is None or jax.process_index() != 0:
      return
    pending = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    step_dir = pending[-1] if pending else self.directory / str(step)
    integrity.write_checksums(step_dir)

  def save(self, step: int, state, data_iterator, config_dict, *, force: bool = False
           ) -> bool:
    self.manager.wait_until_finished()     # one save in flight; _seal reads its step
    self._saving = step
    return save(self.manager, step, state, data_iterator, config_dict, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state, data_iterator, config_dict,
                     report: Callable[[str], None] = print):
    """(step, state) of the newest step that is intact, or (0, None) without steps.

    A step that fails (a file missing, truncated or changed, metadata that does not
    parse, a saved structure that does not match) is reported in one line; once an
    earlier step restores, the failed newer ones are moved to WORKDIR/SET_ASIDE.

    Raises:
      IncompatibleCheckpointError: the intact step was written by another config.
      CheckpointError: steps exist but none restores (nothing is moved then).
    """
    sharding_lib.check_holds(abstract_state, "restoring a checkpoint onto this mesh")
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = integrity.verify(self.directory / str(step))
      if problem is None:
        try:
          saved = saved_config(self.manager, step)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"its config does not read back ({integrity.describe(e)})"
      if problem is None:
        check_compatible_with(saved, step, config_dict, self.workdir)
        try:
          state = restore(self.manager, step, abstract_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"its state does not restore ({integrity.describe(e)})"
      if problem is None:
        if failed:
          self._set_aside([s for s, _ in failed], report)
          report(f"resuming from step {step}, the newest checkpoint that restores")
        return step, state
      failed.append((step, problem))
      report(f"checkpoint step {step} ({self.directory / str(step)}) cannot be restored: "
             f"{problem}")
    if failed:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores (steps "
          f"{', '.join(str(s) for s, _ in failed)}; reasons above). If the code or "
          "config changed since they were written, restore those; to start again from "
          f"step 0, move {self.directory} away (nothing was moved or deleted).")
    return 0, None

  def _set_aside(self, steps, report) -> None:
    if jax.process_index() == 0:
      aside = epath.Path(self.workdir) / SET_ASIDE
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, n = aside / str(step), 0
        while target.exists():
          n += 1
          target = aside / f"{step}.{n}"
        (self.directory / str(step)).rename(target)
        report(f"moved checkpoint step {step} to {target} for inspection")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmjax_checkpoints_set_aside")
    self.manager.reload()


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config_dict,
         *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(config_dict)}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the state (and the iterator, in place) saved at `step`.

  Each array is saved as its shards lie (every process writes its own) and read back
  onto `abstract_state`'s shardings, so a run may resume on another number of processes
  or devices, or another mesh (fsdp=8 saved, data=8 resumed, and back). A target
  sharding an array's shape cannot take is an error naming the array. The data iterator
  is restored from this
  process's own file when the run has as many processes as the one that saved it;
  otherwise from the position every saving process shared (`resharded_data_state`).
  """
  sharding_lib.check_holds(abstract_state, "restoring a checkpoint onto this mesh")
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
  """'field: saved -> current' for every compatibility field that differs.

  A field the saved config lacks and the current one holds at its default value
  (`config_lib.base_config`) is not a difference: it was added to mmjax after the
  checkpoint was written, and its default computes what the older code did.
  """
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  a, b = _flatten(saved), _flatten(current)
  defaults = _flatten(config_lib.base_config().to_dict())
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue
    if any(key == f or key.startswith(f + ".") for f in fields):
      if a.get(key, "<absent>") != b.get(key, "<absent>"):
        diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


class IncompatibleCheckpointError(ValueError):
  pass


def check_compatible(manager, step: int, current_config: Mapping[str, Any], workdir: str):
  check_compatible_with(saved_config(manager, step), step, current_config, workdir)


def check_compatible_with(saved: Mapping[str, Any], step: int,
                          current_config: Mapping[str, Any], workdir: str):
  diffs = config_differences(saved, current_config)
  if diffs:
    raise IncompatibleCheckpointError(
        f"the checkpoint at step {step} in {workdir} was written by a different config; "
        f"these fields differ (saved -> now):\n  " + "\n  ".join(diffs) +
        "\nUse another --workdir, or restore the config it was trained with. "
        "Nothing was overwritten.")
