"""Command line: `python -m mmjax.main --config=configs/default.py --workdir=runs/default`.

Any config field can be overridden (`--config.optimizer.lr=3e-4`); a field that does
not exist is an error naming it.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from mmjax.train import distributed
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(distributed.make_plan(
      coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, mode=_DISTRIBUTED.value,
      timeout_s=_DISTRIBUTED_TIMEOUT.value))
  distributed.quiet_other_processes()
  if _MODE.value == "train":
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    eval_mode.evaluate_workdir(_CONFIG.value, _WORKDIR.value,
                               checkpoint_step=_CHECKPOINT_STEP.value, evals=_EVALS.value)


if __name__ == "__main__":
  app.run(main)
