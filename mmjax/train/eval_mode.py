"""`--mode=eval`: evaluate a checkpoint of a trained workdir without touching it.

    python -m mmjax.main --mode=eval --config=configs/default.py --workdir=runs/default \\
        [--checkpoint_step=300] [--evals=retrieval,zero_shot]

The checkpoint is opened read-only (orbax `read_only=True`) and only the train state is
restored; nothing is written under WORKDIR/checkpoints, and the training run's own
metrics.jsonl, plots and summary.md are left as they are. The results go to their own
folder, WORKDIR/eval/step_<N>/:

    metrics.jsonl   one row {"step": N, "eval/<name>/<metric>": value, ...}
    plots/*.png     the evaluators' plots
    summary.md      the metrics grouped by evaluator, and the evaluators' report sections

Running it again for the same step replaces that folder's files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax

from mmjax import experiment
from mmjax.data import pipeline
from mmjax.evals import evaluators as evaluators_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib
from mmjax.train import summary as summary_lib


def output_dir(workdir: str, step: int) -> str:
  """Where `evaluate_workdir` writes the results of the checkpoint at `step`."""
  return os.path.join(os.path.abspath(workdir), "eval", f"step_{step}")


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in WORKDIR/checkpoints (read-only).

  Raises ValueError when the workdir has no checkpoint at all.
  """
  workdir = os.path.abspath(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"--mode=eval: {workdir} has no checkpoints ({directory} does not "
                     "exist); train it first with --mode=train")
  manager = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise ValueError(f"--mode=eval: {directory} holds no finished checkpoint; train "
                     "first with --mode=train")
  return steps


def abstract_train_state(config, model, featurize, mesh):
  """Shapes, dtypes and shardings of the config's train state (laid out by
  `config.sharding` on `mesh`, as the trainer lays it out), computed without running
  the model: the target of the restore."""
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              max_logit_scale=config.model.max_logit_scale,
                              adapters=experiment.adapters_key(config))
  sample = experiment.sample_batch(pipeline.make_source(config.data, "train"), featurize)

  def init(rng):
    params = step_lib.init_variables(model, sample, rng)["params"]
    return step_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  shapes = jax.eval_shape(init, jax.random.key(0))
  specs = sharding_lib.specs_from_config(shapes.params, mesh, config.sharding)
  shardings = step_lib.state_shardings(model, tx, sample, mesh, specs)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def evaluate_workdir(config, workdir: str, *, checkpoint_step: int | None = None,
                     evals: Sequence[str] | None = None) -> dict[str, float]:
  """Runs the evaluators of `config` on a checkpoint of `workdir`.

  Args:
    config: the config the workdir was trained with (fields that fix the saved state
      must match, see `checkpoint.check_compatible`; eval fields may differ).
    workdir: a training workdir with WORKDIR/checkpoints.
    checkpoint_step: the step to restore; default the latest.
    evals: names in `config.evals` to run; default all of them.

  Returns:
    {'eval/<name>/<metric>': float}. Also written (process 0) to
    `output_dir(workdir, step)`: metrics.jsonl, plots/*.png, summary.md.

  Raises:
    ValueError: no checkpoints in the workdir, a `checkpoint_step` that was not saved
      (the saved ones are listed), an unknown evaluator name, a split the data lacks,
      a modality the model does not produce, or a checkpoint written by another config.
  """
  started = time.time()
  workdir = os.path.abspath(workdir)
  steps = checkpoint_steps(workdir)
  step = steps[-1] if checkpoint_step is None else int(checkpoint_step)
  if step not in steps:
    raise ValueError(f"--checkpoint_step={step}: {workdir}/checkpoints has no checkpoint at "
                     f"that step; saved steps: {steps}")
  mesh = mesh_lib.make_mesh(config.mesh)
  experiment.check_config(config, mesh)
  evaluators = experiment.build_evaluators(config, only=evals)
  if not evaluators:
    raise ValueError("--mode=eval: config.evals names no evaluator to run")

  manager = ckpt_lib.make_manager(workdir, read_only=True)
  try:
    config_dict = json.loads(config.to_json_best_effort())
    ckpt_lib.check_compatible(manager, step, config_dict, workdir)
    featurize = experiment.make_featurize(config)
    model = experiment.build_model(config)
    state = ckpt_lib.restore(manager, step,
                             abstract_train_state(config, model, featurize, mesh))
  finally:
    manager.close()

  out_dir = output_dir(workdir, step)
  reports: dict[str, str] = {}
  apply_fn = step_lib.make_apply_fn(model)
  ctx = experiment.eval_context(config, workdir=out_dir, mesh=mesh_lib.eval_mesh(mesh),
                                featurize=featurize,
                                step=step, reports=reports,
                                predict=lambda batch: apply_fn(state.params, batch))
  metrics = evaluators_lib.run_evaluators(ctx, evaluators, force=True)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    summary_lib.write_summary(out_dir, config, metrics, wall_time=time.time() - started,
                              step=step, mode="eval", extra_sections=reports)
  return metrics
