"""Faults: every fault of docs/checkpoints.md injected into a short run, then the rerun
checked against an uninterrupted run; and what checkpoint integrity costs.

Part 1 runs the CLI (`python -m mmjax.main`, one CPU device) on
`configs/default.py:runlocal` with 24 steps, a checkpoint every 6 and a loss logged at
every step. For each fault it injects the fault (a signal, a damaged file, a second
trainer, ...), reruns the same command until the run finishes, and reports whether
  * the rerun finished (exit 0, the last step logged),
  * `train/loss` at every step equals the uninterrupted run's bit for bit, each step
    logged once,
  * every step that a message calls saved or kept was on disk when the message was
    printed.
Faults that need an evaluator to raise are injected in this process (the retrieval
evaluator is wrapped) on the same config.

Part 2 measures what the checksum manifest costs on the default experiment: the time
of a save (call to commit) with and without the manifest, and the manifest's own
write and verify times, over several saves.

    python benchmarks/bench_faults.py [--workdir /tmp/faults] [--saves 6]
"""
import argparse
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "default.py") + ":runlocal"
TOTAL, EVERY = 24, 6
STEPS = [f"--config.total_steps={TOTAL}", f"--config.checkpoint_every_steps={EVERY}",
         "--config.log_every_steps=1", "--config.eval_every_steps=1000",
         "--config.keep_checkpoints=10"]
KEPT = re.compile(r"saved step (\d+)|checkpoint \(step (\d+)\) is kept|last finished "
                  r"checkpoint is step (\d+)|resuming from step (\d+)")


def cli(workdir, *extra):
  env = dict(os.environ, CI="true", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  return [sys.executable, "-m", "mmjax.main", f"--config={CONFIG}",
          f"--workdir={workdir}", *STEPS, *extra], env


def losses(workdir):
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  steps = [r["step"] for r in rows if "train/loss" in r]
  return steps, {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def kept_steps_present(output, workdir):
  named = {int(g) for m in KEPT.finditer(output) for g in m.groups() if g}
  have = {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}
  return named <= have, sorted(named)


def run_to_end(workdir):
  cmd, env = cli(workdir)
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  return r.returncode, r.stdout + r.stderr


def wait_for(predicate, proc, timeout=600):
  deadline = time.time() + timeout
  while not predicate() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)


def logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = [l for l in open(path).read().splitlines() if l.strip()]
  try:
    return json.loads(lines[-1])["step"] if lines else 0
  except ValueError:
    return 0


def started(workdir):
  cmd, env = cli(workdir)
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def fault_signal(workdir, sig, times=1, at=9):
  proc = started(workdir)
  wait_for(lambda: logged_step(workdir) >= at, proc)
  for _ in range(times):
    proc.send_signal(sig)
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=600)
  return f"exit {proc.returncode}", out


def fault_kill_mid_save(workdir):
  proc = started(workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  wait_for(lambda: logged_step(workdir) > EVERY and glob.glob(f"{ckpt}/*tmp*"), proc)
  proc.kill()
  proc.communicate()
  return "SIGKILL while a save was in flight", ""


def fault_kill_before_first_checkpoint(workdir):
  proc = started(workdir)
  wait_for(lambda: logged_step(workdir) >= 3, proc)
  proc.kill()
  proc.communicate()
  return "SIGKILL at step 3, before any checkpoint", ""


def damaged(corrupt):
  def fault(workdir):
    note, out = fault_signal(workdir, signal.SIGTERM, at=15)      # saves 12 (every 6) + 15+
    latest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
    what = corrupt(os.path.join(workdir, "checkpoints", str(latest)))
    return f"stopped at {latest}, then {what}", out
  return fault


def _largest(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def truncate(step_dir):
  with open(_largest(step_dir), "r+b") as f:
    f.truncate(100)
  return "its largest array file truncated"


def delete(step_dir):
  os.remove(_largest(step_dir))
  return "its largest array file deleted"


def garbage(name):
  def corrupt(step_dir):
    with open(os.path.join(step_dir, name), "w") as f:
      f.write("{garbage")
    return f"garbage in {name}"
  return corrupt


def fault_second_writer(workdir):
  first = started(workdir)
  wait_for(lambda: logged_step(workdir) >= 2, first)
  cmd, env = cli(workdir)
  second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  out, _ = first.communicate(timeout=600)
  said = (second.stdout + second.stderr).strip().splitlines()[-1]
  return f"second trainer: exit {second.returncode}: {said[:90]}", out


def in_process_faults(base, reference):
  """Evaluator faults, injected through a wrapped evaluator in this process."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mmjax import config_lib, registry  # pylint: disable=g-import-not-at-top
  from mmjax.evals import evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  evaluators_lib._import_evaluator_modules()  # pylint: disable=protected-access
  real = evaluators_lib.EVALUATORS["retrieval"]
  hook = {"step": None, "error": None}

  def retrieval(ctx, c):
    if ctx.step == hook["step"]:
      raise hook["error"]
    return real.obj(ctx, c) if ctx.step == TOTAL else {}

  evaluators_lib.EVALUATORS["retrieval"] = registry.Entry(retrieval, real.fields)

  def config(**kw):
    c = config_lib.load_config(CONFIG)
    c.total_steps, c.checkpoint_every_steps, c.log_every_steps = TOTAL, EVERY, 1
    c.eval_every_steps, c.keep_checkpoints = 1000, 10
    c.evals = {"retrieval": config_lib.evaluator_config("retrieval", batch_size=32,
                                                        every=1)}
    for k, v in kw.items():
      setattr(c, k, v)
    return c

  if reference is None:      # no CLI reference run: this process's own, same config
    ref_dir = os.path.join(base, "reference_in_process")
    with contextlib.redirect_stdout(io.StringIO()):
      trainer.train_and_evaluate(config(), ref_dir)
    reference = losses(ref_dir)[1]
  rows = []
  for name, step, error, kw in [
      ("an evaluator raises at the last step (evals_fail='continue')", TOTAL,
       ValueError("every row of x is the same"), {}),
      ("an evaluator raises while a save is in flight (evals_fail='stop')", EVERY + 1,
       RuntimeError("injected"), {"evals_fail": "stop"})]:
    workdir = os.path.join(base, re.sub(r"\W+", "_", name)[:40])
    hook.update(step=step, error=error)
    note, out = "run finished", io.StringIO()
    with contextlib.redirect_stdout(out):
      try:
        trainer.train_and_evaluate(config(**kw), workdir)
      except RuntimeError as e:
        note = f"raised {type(e).__name__}: {e}"
    hook.update(step=None)
    kept_before, _ = kept_steps_present(out.getvalue(), workdir)
    have = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())
    failed = [l for l in out.getvalue().splitlines() if "failed at step" in l]
    rerun = io.StringIO()
    with contextlib.redirect_stdout(rerun):
      trainer.train_and_evaluate(config(), workdir)     # the rerun (a no-op if finished)
    kept_after, _ = kept_steps_present(rerun.getvalue(), workdir)
    steps, got = losses(workdir)
    said = (failed[0][:60] + "...; ") if failed else ""
    rows.append((name, f"{said}{note}; steps saved {have}", steps[-1:] == [TOTAL],
                 steps == list(range(1, TOTAL + 1)) and got == reference,
                 kept_before and kept_after))
  evaluators_lib.EVALUATORS["retrieval"] = real
  return rows


def integrity_cost(base, saves):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import config_lib, experiment, models  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import integrity  # pylint: disable=g-import-not-at-top
  from mmjax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config(os.path.join(REPO, "configs", "default.py"))
  mesh = mesh_lib.make_mesh(c.mesh)
  featurize = experiment.make_featurize(c)
  source = pipeline.make_source(c.data, "train")
  data_iter = iter(experiment.train_dataset(c, source, featurize))
  state = step_lib.create_train_state(
      models.build(c.model), opt_lib.make_optimizer(c.optimizer, c.total_steps),
      experiment.sample_batch(source, featurize), jax.random.key(0), mesh)
  config_dict = json.loads(c.to_json_best_effort())
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  def timed_saves(sealed):
    workdir = os.path.join(base, "sealed" if sealed else "plain")
    shutil.rmtree(workdir, ignore_errors=True)
    if sealed:
      store = ckpt_lib.Checkpoints(workdir, keep=saves + 1)
      save, wait = store.save, store.wait
    else:
      manager = ckpt_lib.make_manager(workdir, keep=saves + 1)
      save = lambda *a, **k: ckpt_lib.save(manager, *a, **k)
      wait = manager.wait_until_finished
    times = []
    for step in range(1, saves + 2):
      start = time.perf_counter()
      save(step, state, data_iter, config_dict, force=True)
      wait()
      times.append(time.perf_counter() - start)
    return times[1:], workdir       # the first save pays one-off start-up costs

  plain, _ = timed_saves(False)
  sealed, workdir = timed_saves(True)
  step_dir = os.path.join(workdir, "checkpoints", str(saves + 1))
  write = [_timed(lambda: integrity.write_checksums(step_dir)) for _ in range(saves)]
  verify = [_timed(lambda: integrity.verify(step_dir)) for _ in range(saves)]
  return {"state_mb": n_bytes / 2**20, "plain_s": statistics.median(plain),
          "sealed_s": statistics.median(sealed), "write_s": statistics.median(write),
          "verify_s": statistics.median(verify)}


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def print_rows(rows):
  print("\n| fault | what the faulty run did | rerun finished | losses bit for bit "
        "| kept steps on disk |\n|---|---|---|---|---|")
  for name, note, finished, exact, kept in rows:
    print(f"| {name} | {note} | {'yes' if finished else 'NO'} | "
          f"{'yes' if exact else 'NO'} | {'yes' if kept else 'NO'} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/mmjax_bench_faults")
  parser.add_argument("--saves", type=int, default=6)
  parser.add_argument("--skip_faults", action="store_true", help="only the integrity cost")
  parser.add_argument("--skip_cli_faults", action="store_true",
                      help="only the in-process faults and the integrity cost")
  args = parser.parse_args()
  base = os.path.abspath(args.workdir)
  shutil.rmtree(base, ignore_errors=True)
  os.makedirs(base)
  started_at = time.time()

  if args.skip_cli_faults and not args.skip_faults:
    print_rows(in_process_faults(base, None))
  elif not args.skip_faults:
    ref_dir = os.path.join(base, "reference")
    code, out = run_to_end(ref_dir)
    assert code == 0, out[-3000:]
    _, reference = losses(ref_dir)
    faults = [
        ("SIGTERM at step 9", lambda w: fault_signal(w, signal.SIGTERM)),
        ("Ctrl-C (SIGINT) at step 9", lambda w: fault_signal(w, signal.SIGINT)),
        ("Ctrl-C twice at step 9", lambda w: fault_signal(w, signal.SIGINT, times=2)),
        ("SIGKILL during a save", fault_kill_mid_save),
        ("SIGKILL before the first checkpoint", fault_kill_before_first_checkpoint),
        ("latest step: array file truncated", damaged(truncate)),
        ("latest step: array file deleted", damaged(delete)),
        ("latest step: garbage in config/metadata", damaged(garbage("config/metadata"))),
        ("latest step: garbage in state/_METADATA", damaged(garbage("state/_METADATA"))),
        ("a second trainer on the workdir", fault_second_writer),
    ]
    rows = []
    for name, fault in faults:
      workdir = os.path.join(base, re.sub(r"\W+", "_", name))
      note, fault_out = fault(workdir)
      ok_before, _ = kept_steps_present(fault_out, workdir) if os.path.isdir(
          os.path.join(workdir, "checkpoints")) else (True, [])
      code, out = run_to_end(workdir)
      ok_after, _ = kept_steps_present(out, workdir)
      steps, got = losses(workdir)
      exact = steps == list(range(1, TOTAL + 1)) and got == reference
      rows.append((name, note, code == 0 and steps[-1:] == [TOTAL], exact,
                   ok_before and ok_after))
      print(rows[-1], flush=True)
    rows += in_process_faults(base, reference)
    print_rows(rows)

  cost = integrity_cost(base, args.saves)
  print(f"\nintegrity on the default experiment ({cost['state_mb']:.1f} MiB of train "
        f"state), median of {args.saves} saves:")
  print(f"  save without manifest {cost['plain_s']*1e3:.0f} ms, with manifest "
        f"{cost['sealed_s']*1e3:.0f} ms ({(cost['sealed_s']/cost['plain_s']-1)*100:+.1f}%)")
  print(f"  manifest write {cost['write_s']*1e3:.1f} ms "
        f"({cost['write_s']/cost['plain_s']*100:.1f}% of a save), verify "
        f"{cost['verify_s']*1e3:.1f} ms")
  print(f"total wall time {time.time() - started_at:.0f} s")


if __name__ == "__main__":
  main()
