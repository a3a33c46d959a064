"""The launchers in launch/: 2 processes x 4 devices against 1 x 8 through
`multiprocess_local.sh` (losses per step, final params), SIGTERM to one process, resume
on the same and on another process count; the TPU pod and Slurm scripts' commands;
the Colab quickstart's code cells."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mmjax import experiment
from mmjax import models
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import logging as log_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib
from mmjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TOTAL_STEPS = 10
# Only the preemption and the final step save; one evaluation, at the end. Sums over
# devices in device order (mmjax.collectives), through gloo across processes.
RUN_FLAGS = (f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every_steps=1000",
             "--config.eval_every_steps=1000", "--config.deterministic_reductions=True")
TIMEOUT_S = 600
# The two-process runs shard the params and optimizer state over all 8 devices of both
# processes (every weight matrix of 1024 elements and up) and still match the one-process
# data-parallel reference step for step; their checkpoint restores onto it.
FSDP_FLAGS = ("--config.mesh.data=1", "--config.mesh.fsdp=-1",
              "--config.sharding.fsdp_min_size=1024")


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compare_runs = _load(os.path.join(LAUNCH, "compare_runs.py"), "compare_runs")


def tiny_config(**overrides):
  c = _load(os.path.join(REPO, "tests", "configs", "tiny.py"), "tiny_config").get_config()
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _child_flags(devices):
  """The XLA_FLAGS a launcher hands its processes: the tests' own (`_env`) with the
  device count appended."""
  own = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  return f"{own} --xla_force_host_platform_device_count={devices}".strip()


def _env(**extra):
  env = dict(os.environ, CI="true", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
  env.update(extra)
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  return env


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's launches (a relaunch
  compiles nothing again)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def start_multiprocess(num_processes, devices, workdir, log_path, cache_dir, flags=()):
  """`launch/multiprocess_local.sh N D tests/configs/tiny.py WORKDIR RUN_FLAGS FLAGS`,
  output to `log_path`."""
  log = open(log_path, "w")
  env = _env(JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen(
      [os.path.join(LAUNCH, "multiprocess_local.sh"), str(num_processes), str(devices),
       "tests/configs/tiny.py", workdir, *RUN_FLAGS, *flags],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def finish(proc, log_path):
  try:
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.log.close()
  with open(log_path) as f:
    return proc.returncode, f.read()


def process_pids(log_path):
  """{process index: pid} from the launcher's 'launch: process i pid P' lines."""
  pids = {}
  with open(log_path) as f:
    for line in f:
      if line.startswith("launch: process ") and " pid " in line:
        words = line.split()
        pids[int(words[2])] = int(words[4])
  return pids


def losses(workdir):
  return compare_runs.losses(workdir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, compilation_cache):
  """1 process x 8 devices, uninterrupted."""
  root = tmp_path_factory.mktemp("reference")
  workdir, log = str(root / "run"), str(root / "log.txt")
  rc, out = finish(start_multiprocess(1, 8, workdir, log, compilation_cache), log)
  assert rc == 0, out[-3000:]
  return workdir


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, compilation_cache):
  """2 processes x 4 devices, fsdp=8 (FSDP_FLAGS); SIGTERM to process 1 once step 1 is
  logged. Returns the workdir, a copy of it as the preemption left it, the launcher's
  status and output."""
  root = tmp_path_factory.mktemp("preempted")
  workdir, log = str(root / "run"), str(root / "log.txt")
  proc = start_multiprocess(2, 4, workdir, log, compilation_cache, FSDP_FLAGS)
  deadline = time.time() + TIMEOUT_S
  while not losses_logged(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  pids = process_pids(log)
  assert proc.poll() is None and set(pids) == {0, 1}, open(log).read()[-3000:]
  os.kill(pids[1], signal.SIGTERM)
  rc, out = finish(proc, log)
  copy = str(root / "copy")
  shutil.copytree(workdir, copy)
  return {"workdir": workdir, "copy": copy, "rc": rc, "out": out}


def losses_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and os.path.getsize(path) > 0


@pytest.fixture(scope="module")
def resumed_run(preempted_run, tmp_path_factory, compilation_cache):
  """The preempted 2 x 4 run relaunched with the same command."""
  log = str(tmp_path_factory.mktemp("resumed") / "log.txt")
  rc, out = finish(start_multiprocess(2, 4, preempted_run["workdir"], log, compilation_cache,
                                      FSDP_FLAGS), log)
  assert rc == 0, out[-3000:]
  return {"workdir": preempted_run["workdir"], "out": out}


def _preempted_step(out):
  saved = re.search(r"preempted \(SIGTERM\): saved step (\d+);", out)
  assert saved, out[-3000:]
  return int(saved.group(1))


def test_sigterm_to_one_of_two_processes_saves_one_step_and_both_exit_0(preempted_run):
  assert preempted_run["rc"] == 0, preempted_run["out"][-3000:]   # both processes exit 0
  step = _preempted_step(preempted_run["out"])
  assert 1 <= step < TOTAL_STEPS
  workdir = preempted_run["copy"]
  assert compare_runs.checkpoint_steps(workdir) == [step]
  # Both processes saved their data iterator at that same step.
  data_dir = os.path.join(workdir, "checkpoints", str(step), "data")
  states = {}
  for name in sorted(n for n in os.listdir(data_dir) if n.startswith("process_")):
    with open(os.path.join(data_dir, name)) as f:
      states[name] = json.load(f)
  assert states == {"process_0-of-2.json": {"next_index": step},
                    "process_1-of-2.json": {"next_index": step}}
  assert sorted(losses(workdir)) == list(range(1, step + 1))
  # Process 0 alone wrote the workdir's files; it did not finish, so no summary yet.
  assert not os.path.exists(os.path.join(workdir, "summary.md"))
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_two_processes_match_one_process_per_step_and_in_final_params(reference_run,
                                                                      resumed_run):
  resumed = re.search(r"resumed from step (\d+) in ", resumed_run["out"])
  assert resumed, resumed_run["out"][-3000:]
  assert 1 <= int(resumed.group(1)) < TOTAL_STEPS
  result = compare_runs.compare(reference_run, resumed_run["workdir"])
  assert result["steps"] == list(range(1, TOTAL_STEPS + 1))
  assert result["max_loss_diff"] <= 1e-6, result
  assert result["param_step"] == TOTAL_STEPS
  assert result["max_param_diff"] <= 1e-5, result
  # The 2-process run evaluated (every process embeds its part of the test split) and
  # process 0 wrote the summary.
  rows = log_lib.read_metrics(resumed_run["workdir"])
  assert any("eval/retrieval/image->text/R@1" in r for r in rows)
  assert os.path.exists(os.path.join(resumed_run["workdir"], "summary.md"))


def test_two_process_checkpoint_restores_on_one_process(preempted_run):
  """The 2 x 4 fsdp=8 preemption checkpoint (each process wrote its own shards) restored
  here, by 1 process with 8 devices on data=8: the same params, and the data iterator at
  the same global batch as a one-process run."""
  workdir = preempted_run["copy"]
  step = compare_runs.checkpoint_steps(workdir)[-1]
  # Saved as the shards lay: arrays sharded over fsdp, both processes wrote shard data.
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  with open(os.path.join(state_dir, "_sharding")) as f:
    specs = [json.loads(v)["partition_spec"] for v in json.load(f).values()]
  assert sum("fsdp" in json.dumps(spec) for spec in specs) >= 10, specs
  for p in (0, 1):
    shard_data = os.path.join(state_dir, f"ocdbt.process_{p}", "d")
    assert sum(os.path.getsize(os.path.join(shard_data, n)) for n in os.listdir(shard_data))
  config = tiny_config(total_steps=TOTAL_STEPS)
  mesh = mesh_lib.make_mesh(config.mesh)
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, "train")

  def stream():
    return iter(pipeline.train_dataset(source, featurize, seed=config.seed,
                                       global_batch_size=config.batch_size, num_threads=1))

  model = models.build(config.model)
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
  state = step_lib.create_train_state(model, tx, experiment.sample_batch(source, featurize),
                                      jax.random.key(0), mesh)
  restored_iter = stream()
  manager = ckpt_lib.make_manager(workdir, read_only=True)
  restored = ckpt_lib.restore(manager, step, step_lib.abstract_state(state), restored_iter)
  assert int(restored.step) == step
  saved = compare_runs.load_params(workdir, step)
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  fresh = stream()
  for _ in range(step):
    next(fresh)
  for _ in range(2):           # the next global batches, in the same order
    np.testing.assert_array_equal(next(restored_iter)["index"], next(fresh)["index"])


# ---------------------------------------------------------------------------------------
# Argument handling and the cluster launchers' commands (nothing is trained here).
# ---------------------------------------------------------------------------------------


def _fake_python(tmp_path, body):
  path = tmp_path / "fake_python"
  path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return str(path)


def test_multiprocess_local_rejects_bad_arguments():
  script = os.path.join(LAUNCH, "multiprocess_local.sh")
  r = subprocess.run([script, "2", "4", "configs/default.py"], capture_output=True,
                     text=True, env=_env())
  assert r.returncode == 2
  assert "expected NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR, got 3" in r.stderr
  r = subprocess.run([script, "0", "4", "configs/default.py", "/tmp/x"], capture_output=True,
                     text=True, env=_env())
  assert r.returncode == 2 and "NUM_PROCESSES must be a positive integer, got '0'" in r.stderr


def test_multiprocess_local_passes_flags_and_stops_the_others_when_one_fails(tmp_path):
  # Process 1 fails at once; process 0 would run for a minute.
  fake = _fake_python(tmp_path, """
      echo "args: $*"
      echo "xla: $XLA_FLAGS platforms: $JAX_PLATFORMS"
      for a in "$@"; do [[ $a == --process_id=1 ]] && exit 3; done
      exec sleep 60
  """)
  start = time.time()
  r = subprocess.run([os.path.join(LAUNCH, "multiprocess_local.sh"), "2", "3", "c.py", "w",
                      "--config.seed=4"], capture_output=True, text=True,
                     env=_env(PYTHON=fake, COORDINATOR_PORT="23456", STOP_GRACE_S="1"),
                     timeout=60)
  assert r.returncode == 3, r.stderr
  assert time.time() - start < 30
  assert "process 1 (pid" in r.stderr and "exited with status 3; stopping the others" in r.stderr
  for i in (0, 1):
    assert (f"-u -m mmjax.main --config=c.py --workdir=w --coordinator_address=127.0.0.1:23456 "
            f"--num_processes=2 --process_id={i} --config.seed=4") in r.stdout
  assert "[process 1] args:" in r.stdout                 # others' output is prefixed
  assert f"xla: {_child_flags('3')} platforms: cpu" in r.stdout


def test_local_sh_runs_main_with_the_config_and_flags(tmp_path):
  fake = _fake_python(tmp_path, """
      echo "args: $*"
      echo "xla: $XLA_FLAGS"
  """)
  r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "configs/default.py", "runs/x",
                      "--config.total_steps=5"], capture_output=True, text=True,
                     env=_env(PYTHON=fake, CPU_DEVICES="2"))
  assert r.returncode == 0, r.stderr
  assert "args: -m mmjax.main --config=configs/default.py --workdir=runs/x " \
         "--config.total_steps=5" in r.stdout
  assert f"xla: {_child_flags('2')}\n" in r.stdout
  r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "configs/default.py"],
                     capture_output=True, text=True, env=_env())
  assert r.returncode == 2 and "expected CONFIG WORKDIR, got 1" in r.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  script = os.path.join(LAUNCH, "tpu_pod.sh")
  env = _env(PROJECT="my-project", PATH="/usr/bin:/bin")     # no gcloud needed
  r = subprocess.run([script, "--dry-run", "--setup", "pod-1", "us-central2-b",
                      "configs/default.py", "/mnt/shared/runs/a", "--config.total_steps=20",
                      "--config.name=two words"], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  assert [w[:2] for w in lines] == [["git", "-C"], ["gcloud", "compute"],
                                    ["gcloud", "compute"], ["gcloud", "compute"]]
  scp, install, train = lines[1], lines[2], lines[3]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "pod-1:mmjax-src.tar.gz" in scp and "--worker=all" in scp
  for words in (install, train):
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert {"--worker=all", "--zone=us-central2-b", "--project=my-project"} <= set(words)
  assert "jax[tpu]>=0.10.2,<0.11" in shlex.split(install[-1].removeprefix("--command="))
  remote = shlex.split(train[-1].removeprefix("--command="))
  assert remote == ["cd", "mmjax", "&&", "python3", "-m", "mmjax.main", "--distributed=on",
                    "--config=configs/default.py", "--workdir=/mnt/shared/runs/a",
                    "--config.total_steps=20", "--config.name=two words"]
  # Without --setup: the training command only.
  r = subprocess.run([script, "--dry-run", "pod-1", "europe-west4-a", "c.py", "/w"],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
  assert "--zone=europe-west4-a" in r.stdout
  r = subprocess.run([script, "--dry-run", "pod-1", "zone"], capture_output=True, text=True,
                     env=env)
  assert r.returncode == 2 and "expected TPU_NAME ZONE CONFIG WORKDIR, got 2" in r.stderr
  r = subprocess.run([script, "--dryrun", "pod-1", "z", "c", "w"], capture_output=True,
                     text=True, env=env)
  assert r.returncode == 2 and "unknown option --dryrun" in r.stderr


def test_slurm_sbatch_runs_srun_one_process_per_gpu_or_per_node(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  # A stand-in srun: print its options, then run the task once.
  srun.write_text(textwrap.dedent("""\
      #!/bin/bash
      opts=()
      while [[ $1 == --* ]]; do opts+=("$1"); shift; done
      echo "srun ${opts[*]}"
      exec "$@"
  """))
  srun.chmod(0o755)
  fake = _fake_python(tmp_path, """
      echo "task: $*"
      echo "local devices: ${JAX_LOCAL_DEVICE_IDS:-<unset>}"
  """)
  script = os.path.join(LAUNCH, "slurm_gpu.sbatch")
  base = _env(PATH=f"{bin_dir}:/usr/bin:/bin", PYTHON=fake, SLURM_SUBMIT_DIR=REPO,
              SLURM_GPUS_ON_NODE="4")
  args = ["bash", script, "configs/default.py", "/shared/runs/a", "--config.seed=1"]
  r = subprocess.run(args, capture_output=True, text=True, env=base)
  assert r.returncode == 0, r.stderr
  assert "srun --kill-on-bad-exit=1" in r.stdout
  assert ("task: -u -m mmjax.main --config=configs/default.py --workdir=/shared/runs/a "
          "--config.seed=1") in r.stdout
  assert "local devices: <unset>" in r.stdout        # JAX gives process i GPU i
  r = subprocess.run(args, capture_output=True, text=True, env=dict(base, PROCESS_PER="node"))
  assert r.returncode == 0, r.stderr
  assert "local devices: 0,1,2,3" in r.stdout        # one process drives all 4
  r = subprocess.run(args, capture_output=True, text=True, env=dict(base, PROCESS_PER="rack"))
  assert r.returncode == 2 and "PROCESS_PER must be gpu or node, got 'rack'" in r.stderr
  # The #SBATCH header asks for the preemption signal and a requeue.
  with open(script) as f:
    header = f.read()
  assert "#SBATCH --signal=TERM@120" in header and "#SBATCH --requeue" in header


# ---------------------------------------------------------------------------------------
# The Colab quickstart.
# ---------------------------------------------------------------------------------------

_RUN_CELLS = textwrap.dedent("""
    import json, sys
    with open(sys.argv[1]) as f:
      notebook = json.load(f)
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(notebook["cells"]):
      if cell["cell_type"] == "code":
        print(f"--- cell {i}", flush=True)
        exec(compile("".join(cell["source"]), f"<cell {i}>", "exec"), namespace)
""")


def test_quickstart_notebook_code_cells_run_in_order(tmp_path):
  path = os.path.join(LAUNCH, "quickstart.ipynb")
  with open(path) as f:
    notebook = json.load(f)
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 5 and notebook["nbformat"] == 4
  assert not any(c["outputs"] for c in code)             # stored without outputs
  assert "pip" in "".join(code[0]["source"])             # the install cell comes first
  workdir = str(tmp_path / "quickstart")
  env = _env(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", QUICKSTART_STEPS="6",
             QUICKSTART_WORKDIR=workdir)
  r = subprocess.run([sys.executable, "-c", _RUN_CELLS, path], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=TIMEOUT_S)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert r.stdout.count("--- cell") == len(code)
  assert "retrieval at step 6 (64 test pairs" in r.stdout
  assert "image->text/R@1 " in r.stdout
  rows = log_lib.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
