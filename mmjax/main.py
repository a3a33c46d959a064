"""Command line: `python -m mmjax.main --config=configs/default.py --workdir=runs/default`.

Any config field can be overridden (`--config.optimizer.lr=3e-4`); a field that does
not exist is an error naming it.

The run prints its progress lines, evaluations and warnings; the libraries' INFO logs
(orbax's dozens of lines per checkpoint, jax's backend probing) are off unless one of
absl's logging flags is given: `--verbosity=0` (or `-v 0`; 1 and up for debug),
`--logger_levels=orbax:INFO`, `--logtostderr`, `--alsologtostderr`.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import distributed
from mmjax.train import lock as lock_lib
from mmjax.train import eval_mode
from mmjax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file "
                                          "(path.py or path.py:arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, plots go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes) or eval.")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "--mode=eval: the checkpoint step to evaluate (default: the "
    "latest).")
_EVALS = flags.DEFINE_list("evals", None, "--mode=eval: names in config.evals to run "
                           "(default: all).")
# Multi-process runs (see mmjax/train/distributed.py and launch/).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, for a "
    "multi-process run outside Slurm/Open MPI/TPU pods (with --num_processes, --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES), "auto: join a multi-process run when the "
    "flags above or Slurm/Open MPI say so; on: always (TPU pods: JAX detects the workers); "
    "off: never.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", distributed.DEFAULT_TIMEOUT_S, "Seconds to wait for the "
    "coordinator and the other processes.")
flags.mark_flags_as_required(["config", "workdir"])

USER_FACING_ERRORS = (ckpt_lib.CheckpointError, ckpt_lib.IncompatibleCheckpointError,
                      lock_lib.WorkdirInUseError, trainer.NonFiniteLossError)

# Loggers of the libraries whose INFO lines would drown the run's own output.
QUIET_LOGGERS = ("absl", "orbax", "jax", "grain", "matplotlib", "tensorflow", "tensorstore")
# absl's logging flags: any of them on the command line keeps absl's levels as they are.
LOGGING_FLAGS = ("verbosity", "logger_levels", "logtostderr", "alsologtostderr")


def quiet_library_logs(flag_values=flags.FLAGS) -> bool:
  """Sets `QUIET_LOGGERS` to WARNING unless a flag of `LOGGING_FLAGS` was given
  (`orbax` logs through the 'absl' logger). Returns whether it did."""
  if any(flag_values[name].present for name in LOGGING_FLAGS if name in flag_values):
    return False
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  return True


def parse_flags(argv):
  """absl's flag parsing, with one more clear error: a `--config.a.b=` override whose
  last key the config does not hold (ml_collections raises a bare AttributeError)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip("'\"")
    culprits = [a.split("=", 1)[0] for a in argv[1:]
                if a.startswith("--config.") and a.split("=", 1)[0].split(".")[-1] == key]
    where = culprits[0] if culprits else f"a --config override naming {key!r}"
    sys.exit(f"FATAL Flags parsing error: {where}: the config has no key {key!r} there. "
             "A dict-valued field whose default leaves that key out takes it in the config "
             f"file (e.g. `c.{where.removeprefix('--config.')} = ...` in a config that "
             "builds on yours); data.missing.rates and data.missing.mnar_rates hold a key "
             "per modality of the data.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  distributed.initialize(distributed.make_plan(
      coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, mode=_DISTRIBUTED.value,
      timeout_s=_DISTRIBUTED_TIMEOUT.value))
  distributed.quiet_other_processes()
  if _MODE.value == "train":
    try:
      trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except KeyboardInterrupt:
      sys.exit(130)          # the trainer said which checkpoint is the last finished one
    except USER_FACING_ERRORS as e:
      # Errors whose message says all there is to say (the workdir, the step, the
      # fix); any other error keeps its traceback.
      if flags.FLAGS["verbosity"].present:
        raise
      sys.exit(f"error: {e}")
  else:
    eval_mode.evaluate_workdir(_CONFIG.value, _WORKDIR.value,
                               checkpoint_step=_CHECKPOINT_STEP.value, evals=_EVALS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
