"""Fault injection on the tiny config: every fault a run can meet ends in a rerun whose
losses equal an uninterrupted run's bit for bit, with a message naming what happened.

The faults come from inside the run where that is possible: the retrieval evaluator is
wrapped (for the whole module) so that a test can run a hook at any step, to send the
process SIGINT, raise, or do nothing.
"""

import contextlib
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import pytest

from mmjax import experiment
from mmjax import registry as registry_lib
from mmjax.data import missing as missing_lib
from mmjax.evals import evaluators as evaluators_lib
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import integrity
from mmjax.train import lock as lock_lib
from mmjax.train import logging as log_lib
from mmjax.train import optimizer as opt_lib
from mmjax.train import trainer

from test_train import REPO, _cli, _losses, tiny_config

TOTAL = 6
HOOK = {"fn": None}      # fn(step), run by the wrapped evaluator at every step


@pytest.fixture(scope="module", autouse=True)
def hooked_evaluator():
  evaluators_lib._import_evaluator_modules()     # the registry, filled
  real = evaluators_lib.EVALUATORS["retrieval"]

  def retrieval(ctx, c):
    if HOOK["fn"] is not None:
      HOOK["fn"](ctx.step)
    return real.obj(ctx, c) if ctx.step == TOTAL else {}

  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(evaluators_lib.EVALUATORS, "retrieval",
               registry_lib.Entry(retrieval, real.fields))
    yield
  HOOK["fn"] = None


@pytest.fixture(autouse=True)
def no_hook():
  HOOK["fn"] = None
  yield
  HOOK["fn"] = None


def config(**overrides):
  c = tiny_config(total_steps=TOTAL, checkpoint_every_steps=2, keep_checkpoints=5,
                  **overrides)
  c.evals.retrieval.every = 1          # the hook sees every step
  return c


def run(workdir, hook=None, **overrides):
  HOOK["fn"] = hook
  try:
    return trainer.train_and_evaluate(config(**overrides), str(workdir))
  finally:
    HOOK["fn"] = None


def at(step, action):
  return lambda s: action() if s == step else None


def sigint():
  os.kill(os.getpid(), signal.SIGINT)


def steps_logged(workdir):
  return [r["step"] for r in log_lib.read_metrics(str(workdir)) if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  run(workdir)
  return _losses(str(workdir))


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
  """A workdir whose run was stopped by Ctrl-C at step 4 (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp("stopped")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    run(workdir, hook=at(4, sigint))
  (workdir / "stdout.txt").write_text(out.getvalue())
  return workdir


def assert_exact(workdir, reference):
  assert steps_logged(workdir) == list(range(1, TOTAL + 1))   # each step once
  assert _losses(str(workdir)) == reference                  # bit for bit


def test_sigint_saves_at_the_next_step_and_the_rerun_is_exact(stopped_at_4, reference,
                                                               tmp_path, capsys):
  assert "interrupted (SIGINT): saved step 4" in (stopped_at_4 / "stdout.txt").read_text()
  manager = ckpt_lib.make_manager(str(stopped_at_4), read_only=True)
  assert manager.all_steps() == [2, 4]
  assert not glob.glob(os.path.join(stopped_at_4, "checkpoints", "*tmp*"))
  assert steps_logged(stopped_at_4) == [1, 2, 3, 4]
  workdir = tmp_path / "w"
  shutil.copytree(stopped_at_4, workdir)
  run(workdir)
  assert "resumed from step 4" in capsys.readouterr().out
  assert_exact(workdir, reference)


def test_a_second_ctrl_c_interrupts_at_once():
  stop = trainer._StopSignals()
  stop._handle(signal.SIGINT, None)
  assert stop.requested == "SIGINT" and stop.reached(3)
  with pytest.raises(KeyboardInterrupt):
    stop._handle(signal.SIGINT, None)


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(100)
  return os.path.relpath(path, step_dir)


def _delete(step_dir):
  path = _largest_array_file(step_dir)
  os.remove(path)
  return os.path.relpath(path, step_dir)


def _garbage(name):
  def corrupt(step_dir):
    with open(os.path.join(step_dir, name), "w") as f:
      f.write("{not json")
    return name
  return corrupt


def _truncate_unsealed(step_dir):
  # A step without a checksum manifest: the restore attempt is the only check.
  os.remove(os.path.join(step_dir, integrity.MANIFEST))
  _truncate(step_dir)
  return "its state does not restore"


@pytest.mark.parametrize("corrupt", [_truncate, _delete, _garbage("state/_METADATA"),
                                     _garbage("config/metadata"),
                                     _garbage("_CHECKPOINT_METADATA")],
                         ids=["truncated", "deleted", "state-metadata", "config-metadata",
                              "step-metadata"])
def test_the_checksum_manifest_names_the_damaged_file(corrupt, stopped_at_4, tmp_path):
  step_dir = tmp_path / "4"
  shutil.copytree(stopped_at_4 / "checkpoints" / "4", step_dir)
  assert integrity.verify(step_dir) is None
  named = corrupt(str(step_dir))
  problem = integrity.verify(step_dir)
  assert problem is not None and f"file {named} " in problem, problem


# The whole fallback, through the trainer, for a file the manifest checks, a metadata
# file, and a step without a manifest (its restore attempt fails).
@pytest.mark.parametrize("corrupt", [_truncate, _garbage("config/metadata"),
                                     _truncate_unsealed],
                         ids=["truncated", "config-metadata", "truncated-without-manifest"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(
    corrupt, stopped_at_4, reference, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(stopped_at_4, workdir)
  capsys.readouterr()
  named = corrupt(os.path.join(workdir, "checkpoints", "4"))
  run(workdir)
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("checkpoint step 4"))
  assert "cannot be restored" in line and named in line, out
  assert "resuming from step 2" in out and "resumed from step 2" in out
  assert "Traceback" not in out
  aside = os.path.join(workdir, ckpt_lib.SET_ASIDE, "4")
  assert os.path.isdir(aside), out                    # moved, not deleted
  assert_exact(workdir, reference)


def test_no_step_that_restores_is_an_error_that_moves_nothing(stopped_at_4, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(stopped_at_4, workdir)
  for step in (2, 4):
    _truncate(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"no checkpoint in .* restores \(steps 4, 2.*move .* away"):
    run(workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.SET_ASIDE))


def test_a_second_trainer_on_the_workdir_stops_at_once(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock_lib.WorkdirInUseError,
                       match=rf"in use .*pid {os.getpid()} on host {socket.gethostname()}"):
      run(tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_the_lock_of_a_killed_trainer_is_free(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
       "from mmjax.train import lock; l = lock.WorkdirLock(sys.argv[2]).acquire(); "
       "print('held', flush=True); time.sleep(600)", REPO, str(tmp_path)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(lock_lib.WorkdirInUseError, match=f"pid {holder.pid}"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path, reference):
  # What a SIGKILL mid-save leaves: rows past any checkpoint (one cut short) and an
  # unfinished step directory.
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 9.0}\n{"step": 3, "tr')
  os.makedirs(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "state")
  run(tmp_path)
  assert_exact(tmp_path, reference)


def test_an_error_while_a_save_is_in_flight_waits_for_it(tmp_path, reference):
  def boom():
    raise RuntimeError("injected")
  with pytest.raises(RuntimeError, match="injected"):
    run(tmp_path, hook=at(3, boom), evals_fail="stop")
  assert ckpt_lib.make_manager(str(tmp_path), read_only=True).all_steps() == [2]
  assert not glob.glob(os.path.join(tmp_path, "checkpoints", "*tmp*"))
  assert integrity.verify(os.path.join(tmp_path, "checkpoints", "2")) is None
  run(tmp_path)
  assert_exact(tmp_path, reference)


def test_a_failing_evaluator_does_not_block_the_run(tmp_path, reference, capsys):
  def collapse():
    raise ValueError("every row of x is the same")
  metrics = run(tmp_path, hook=at(TOTAL, collapse))
  out = capsys.readouterr().out
  assert (f"evaluator 'retrieval' failed at step {TOTAL}, its metrics are skipped "
          "(evals_fail='continue'): ValueError: every row of x is the same") in out
  assert not any(k.startswith("eval/retrieval") for k in metrics)
  assert ckpt_lib.make_manager(str(tmp_path), read_only=True).latest_step() == TOTAL
  summary = open(tmp_path / "summary.md").read()
  assert "Evaluators that failed" in summary and "every row of x" in summary
  assert_exact(tmp_path, reference)

  # Rerunning the finished workdir changes nothing.
  files = {p: open(p, "rb").read() for p in (tmp_path / "summary.md", tmp_path /
                                            "metrics.jsonl", tmp_path / "config.json")}
  assert run(tmp_path) == log_lib.last_metrics(str(tmp_path))
  assert "already finished its 6 steps" in capsys.readouterr().out
  assert files == {p: open(p, "rb").read() for p in files}
  with pytest.raises(ValueError, match=r"total_steps=4 is below step 6"):
    trainer.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=2,
                                           keep_checkpoints=5), str(tmp_path))


def test_evals_fail_must_be_continue_or_stop(tmp_path):
  with pytest.raises(ValueError, match=r"evals_fail='sometimes': use one of"):
    run(tmp_path, evals_fail="sometimes")


def test_metrics_rows_cut_short_are_left_out_and_truncated(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
  assert [r["step"] for r in log_lib.read_metrics(str(tmp_path))] == [1, 2]
  log_lib.truncate_metrics(str(tmp_path), 1)
  assert open(tmp_path / "metrics.jsonl").read() == '{"step": 1, "a": 1}\n'
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "a": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a JSON row"):
    log_lib.read_metrics(str(tmp_path))


@pytest.mark.parametrize("field, value, match", [
    ("total_steps", 0, r"total_steps=0 is out of range: it must be a whole number >= 1"),
    ("batch_size", 0, r"batch_size=0 is out of range: it must be a whole number >= 1"),
    ("log_every_steps", 0, r"log_every_steps=0 is out of range"),
    ("checkpoint_every_steps", -1, r"checkpoint_every_steps=-1 is out of range"),
    ("keep_checkpoints", 0, r"keep_checkpoints=0 is out of range"),
    ("data.sizes.train", 0, r"data.sizes.train=0 is out of range"),
    ("data.noise.image", -0.1, r"data.noise.image=-0.1 is out of range: it must be a "
                               r"number >= 0"),
])
def test_bad_run_values_are_named(field, value, match, mesh8):
  with pytest.raises(ValueError, match=match):
    experiment.check_config(tiny_config(**{field: value}), mesh8)


@pytest.mark.parametrize("field, value, match", [
    ("lr", -1.0, r"optimizer.lr=-1.0 is out of range: it must be a number > 0"),
    ("lr", float("nan"), r"optimizer.lr=nan is out of range"),
    ("warmup_steps", -5, r"optimizer.warmup_steps=-5 is out of range"),
    ("b2", 1.0, r"optimizer.b2=1.0 is out of range: it must be a number in \[0, 1\)"),
    ("min_lr_ratio", 2.0, r"optimizer.min_lr_ratio=2.0 is out of range"),
    ("weight_decay", -0.1, r"optimizer.weight_decay=-0.1 is out of range"),
])
def test_bad_optimizer_values_are_named(field, value, match):
  c = tiny_config(**{f"optimizer.{field}": value})
  with pytest.raises(ValueError, match=match):
    opt_lib.make_optimizer(c.optimizer, c.total_steps)


@pytest.mark.parametrize("field, value, match", [
    ("every", -5, r"config.evals.retrieval.every=-5: use > 0"),
    ("ks", (1, 0), r"config.evals.retrieval.ks\[1\]=0 is out of range"),
    ("batch_size", 0, r"config.evals.retrieval.batch_size must be positive"),
])
def test_bad_evaluator_values_are_named(field, value, match):
  c = tiny_config(**{f"evals.retrieval.{field}": value})
  with pytest.raises(ValueError, match=match):
    experiment.build_evaluators(c)


def test_missing_rates_are_checked_and_keyed_by_modality():
  c = tiny_config()
  assert dict(c.data.missing.rates) == {"image": 0.0, "audio": 0.0, "text": 0.0}
  c.data.missing.kind = "mcar"
  c.data.missing.rates.image = 1.5
  with pytest.raises(ValueError, match=r"data.missing.rates.image=1.5 is out of range"):
    experiment.make_featurize(c)
  c.data.missing.rates.image, c.data.missing.rates.audio = 0.5, 0.2
  with pytest.raises(ValueError, match=r"rates.audio=0.2: the model encodes no modality"):
    experiment.make_featurize(c)
  c.data.missing.rates.audio = 0.0
  assert experiment.make_featurize(c).missingness.rates["image"] == 0.5


def test_dict_keys_on_the_command_line(tmp_path):
  # The key reaches the config (its value is then checked: out of range on purpose,
  # so that the run stops before training).
  cmd, env = _cli(str(tmp_path / "a"), "--config.data.missing.kind=mcar",
                  "--config.data.missing.rates.image=1.5")
  set_ = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert "data.missing.rates.image=1.5 is out of range" in set_.stderr, set_.stderr[-2000:]
  cmd, env = _cli(str(tmp_path / "b"), "--config.objective.weights.clip=0.5")
  bad = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert ("--config.objective.weights.clip: the config has no key 'clip' there" in
          bad.stderr), bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr
  assert not os.path.exists(tmp_path / "b")
