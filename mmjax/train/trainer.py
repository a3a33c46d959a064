"""The training loop, top to bottom: data, model, state, resume, steps, logs, evals,
checkpoints, summary.

Running it again on a workdir that has checkpoints resumes exactly: the train state,
the data iterator and the per-step rng (`fold_in(seed, step)`) all continue where the
last checkpoint stopped, so the losses after the resume equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import experiment
from mmjax.data import pipeline
from mmjax.evals import evaluators as evaluators_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import lock as lock_lib
from mmjax.train import logging as log_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import optimizer as opt_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import step as step_lib
from mmjax.train import summary as summary_lib


class NonFiniteLossError(FloatingPointError):
  pass


class _StopSignals:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a request to save and stop at the
  next step all processes agree on (with several processes, JAX's preemption sync
  point decides the step, from SIGTERM). A second Ctrl-C raises KeyboardInterrupt at
  once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None          # the name of the first signal received
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


EVALS_FAIL = ("continue", "stop")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it has checkpoints). Returns the final
  metrics.

  Process 0 holds the workdir's lock for the whole run (`mmjax.train.lock`): a second
  trainer on the same workdir stops at once.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  experiment.check_config(config, mesh)
  if config.evals_fail not in EVALS_FAIL:
    raise ValueError(f"evals_fail={config.evals_fail!r}: use one of {EVALS_FAIL}")
  objective = experiment.build_objective(config)
  evaluators = experiment.build_evaluators(config)
  if jax.process_index() != 0:
    return _train(config, workdir, mesh, objective, evaluators)
  with lock_lib.WorkdirLock(workdir):
    return _train(config, workdir, mesh, objective, evaluators)


def _train(config, workdir, mesh, objective, evaluators) -> dict[str, float]:
  config_dict = json.loads(config.to_json_best_effort())
  progress_write = lambda message: print(message, flush=True) if (
      jax.process_index() == 0) else None

  # Data.
  featurize = experiment.make_featurize(config)
  train_source = pipeline.make_source(config.data, "train")
  data_iter = iter(experiment.train_dataset(config, train_source, featurize))

  # Model, optimizer, state.
  model = experiment.build_model(config)
  adapters = experiment.adapters_key(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps,
                              max_logit_scale=config.model.max_logit_scale,
                              adapters=adapters)
  tx = experiment.balance_optimizer(config, tx)     # config.balance, if any
  schedule = opt_lib.learning_rate_schedule(config.optimizer, config.total_steps)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  sample = experiment.sample_batch(train_source, featurize)
  # Each parameter's layout on the mesh (replicated without an fsdp or expert axis).
  specs = sharding_lib.specs_from_config(step_lib.abstract_params(model, sample), mesh,
                                         config.sharding)
  state = step_lib.create_train_state(model, tx, sample, init_rng, mesh, specs)

  # Resume: the newest intact checkpoint (damaged ones are set aside, saying so).
  checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  start_step, restored = checkpoints.restore_latest(
      step_lib.abstract_state(state), data_iter, config_dict, report=progress_write)
  if restored is not None:
    state = restored
  elif config.init_from.path:      # a fresh run that starts from a published checkpoint
    state = _init_from(state, config.init_from, tx, mesh, specs, progress_write)
  if start_step > config.total_steps:
    raise ValueError(
        f"total_steps={config.total_steps} is below step {start_step}, which the "
        f"checkpoints in {workdir}/checkpoints reached; set total_steps >= {start_step} "
        "to go on, or use another --workdir")
  if start_step == config.total_steps:
    progress_write(f"{workdir} already finished its {start_step} steps; nothing to do "
                   "(raise total_steps to train on; --mode=eval to evaluate again)")
    return log_lib.last_metrics(workdir)
  log_lib.truncate_metrics(workdir, start_step)     # at every start, step 0 included
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2)

  train_step = step_lib.make_train_step(
      model, objective, config.objective, mesh,
      deterministic_reductions=config.deterministic_reductions,
      frozen=opt_lib.frozen_mask(config.optimizer, state.params, adapters=adapters),
      update_args=experiment.balance_enabled(config),
      specs=specs, microbatches=config.microbatches,
      grad_cache=config.grad_cache.microbatches)
  apply_fn = step_lib.make_apply_fn(model)
  reports: dict[str, str] = {}     # summary.md sections from evaluators (ctx.add_report)
  failures: list[str] = []          # evaluators that raised (config.evals_fail='continue')
  data_info = pipeline.data_info(config.data)
  writer = log_lib.MetricWriter(workdir)
  progress = log_lib.Progress(config.total_steps, start_step, every=config.log_every_steps)

  def evaluator_failed(name: str, step: int, error: Exception) -> None:
    line = (f"evaluator {name!r} failed at step {step}, its metrics are skipped "
            f"(evals_fail='continue'): {type(error).__name__}: {error}")
    progress.write(line)
    failures.append(f"- step {step}: `{name}`: {type(error).__name__}: {error}")

  def evaluate(step: int, force: bool = False) -> dict[str, float]:
    ctx = experiment.eval_context(
        config, workdir=workdir, mesh=mesh_lib.eval_mesh(mesh), featurize=featurize,
        step=step,
        predict=lambda batch: apply_fn(state.params, batch), reports=reports,
        data=data_info)
    return evaluators_lib.run_evaluators(
        ctx, evaluators, force=force,
        on_error=evaluator_failed if config.evals_fail == "continue" else None)

  if start_step:
    progress.write(f"resumed from step {start_step} in {workdir}")
  final_metrics: dict[str, float] = {}
  started = time.time()
  window_start, window_steps = time.perf_counter(), 0
  previous = None    # (step, metrics) of the last step, checked one step late

  def check_finite(step, metrics):
    if not np.isfinite(float(metrics["loss"])):
      checkpoints.wait()        # the message names a step whose save has finished
      raise NonFiniteLossError(
          f"non-finite loss {float(metrics['loss'])} at step {step}; stopped. The last good "
          f"checkpoint (step {checkpoints.latest_step()}) is kept in {workdir}/checkpoints.")

  step = start_step
  try:
    with _StopSignals() as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        batch = pipeline.to_global(next(data_iter), mesh)
        state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
        if previous is not None:
          check_finite(*previous)
        previous = (step, metrics)
        window_steps += 1

        is_last = step == config.total_steps
        if step % config.log_every_steps == 0 or is_last:
          check_finite(step, metrics)
          elapsed = time.perf_counter() - window_start
          row = {f"train/{k}": v for k, v in jax.device_get(metrics).items()}
          row["train/learning_rate"] = float(schedule(step - 1))
          row["train/steps_per_second"] = window_steps / max(elapsed, 1e-9)
          writer.write(step, row)
          progress.update(step, float(row["train/loss"]), row["train/steps_per_second"])
          final_metrics.update(row)
          window_start, window_steps = time.perf_counter(), 0
        else:
          progress.update(step)

        eval_metrics = evaluate(step, force=is_last)
        if eval_metrics:
          writer.write(step, eval_metrics)
          final_metrics.update(eval_metrics)
          progress.write(_format_eval(step, eval_metrics))

        stopping = stop.reached(step)
        if step % config.checkpoint_every_steps == 0 or is_last or stopping:
          check_finite(step, metrics)
          checkpoints.save(step, state, data_iter, config_dict, force=is_last or stopping)
        if stopping:
          checkpoints.wait()
          why = "interrupted" if stop.requested == "SIGINT" else "preempted"
          # (several processes: JAX's preemption sync point, which SIGTERM triggers)
          progress.write(f"{why} ({stop.requested or 'SIGTERM'}): saved step {step}; "
                         "rerun the same command to resume")
          break
    checkpoints.wait()
  except BaseException as e:
    checkpoints.wait()   # a save in flight finishes before the error propagates
    if isinstance(e, KeyboardInterrupt):
      progress.write(f"interrupted at step {step}; the last finished checkpoint is step "
                     f"{checkpoints.latest_step()}; rerun the same command to resume")
    raise
  finally:
    progress.close()
    writer.close()
  if failures:
    reports["Evaluators that failed"] = "\n".join(failures)
  if jax.process_index() == 0:
    summary_lib.plot_training_curves(workdir, config.name)   # also after a preemption
    if step == config.total_steps:
      summary_lib.write_summary(workdir, config, final_metrics,
                                wall_time=time.time() - started, start_step=start_step,
                                extra_sections=reports)
  return final_metrics


def _init_from(state, init_from, tx, mesh, specs, report):
  """`state` with params from `config.init_from` (`mmjax.pretrained.load_from_config`)
  and a fresh optimizer state for them; prints what was loaded."""
  from mmjax import pretrained  # pylint: disable=g-import-not-at-top
  loaded, load_report = pretrained.load_from_config(state.params, init_from)

  def place(new, old):
    if new is old:
      return old
    new = np.asarray(new)
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: new[index])

  params = jax.tree.map(place, loaded, state.params)
  layout = sharding_lib.named(mesh, sharding_lib.state_specs(state, specs))
  opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(params)
  report(str(load_report))
  return state.replace(params=params, opt_state=opt_state)


def _format_eval(step: int, metrics: dict[str, float]) -> str:
  keys = [k for k in metrics if k.endswith("/R@1") or k.endswith("/accuracy")]
  shown = ", ".join(f"{k.removeprefix('eval/')}={metrics[k]:.3f}" for k in keys[:6])
  return f"eval at step {step}: {shown}"
