"""Multi-process plumbing: the launch plan, agreement checks, per-process input, resharded
data-iterator state, and real 2-process `jax.distributed` starts on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mmjax import experiment
from mmjax import config_lib
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import distributed
from mmjax.train import mesh as mesh_lib
from mmjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
             "SLURM_LOCALID": "2", "SLURM_STEP_NODELIST": "node[001-002]",
             "SLURM_STEP_NUM_NODES": "2"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_config(**overrides):
  c = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


# ---------------------------------------------------------------------------------------
# The plan: flags and environment -> how this process joins.
# ---------------------------------------------------------------------------------------


def test_plan_single_process_by_default():
  plan = distributed.make_plan(environ={})
  assert plan == distributed.Plan("single")
  assert not plan.multi_process
  # One task under Slurm is one process too.
  assert not distributed.make_plan(environ=dict(SLURM_ENV, SLURM_NTASKS="1",
                                                SLURM_PROCID="0")).multi_process


def test_plan_from_explicit_flags():
  plan = distributed.make_plan(coordinator_address="127.0.0.1:1234", num_processes=2,
                               process_id=1, timeout_s=30, environ={})
  assert plan == distributed.Plan("flags", "127.0.0.1:1234", 2, 1, 30)
  assert plan.multi_process
  # --num_processes=1 with the other two flags is a one-process run.
  assert not distributed.make_plan(coordinator_address="127.0.0.1:1234", num_processes=1,
                                   process_id=0, environ={}).multi_process


def test_plan_from_slurm_and_open_mpi_environments():
  plan = distributed.make_plan(environ=SLURM_ENV)
  assert (plan.source, plan.num_processes, plan.process_id) == ("slurm", 4, 2)
  assert plan.coordinator_address is None       # JAX derives it from the node list
  # Flags that agree with Slurm are accepted.
  assert distributed.make_plan(num_processes=4, process_id=2, environ=SLURM_ENV) == plan
  plan = distributed.make_plan(environ={"OMPI_COMM_WORLD_SIZE": "3",
                                        "OMPI_COMM_WORLD_RANK": "0"})
  assert (plan.source, plan.num_processes, plan.process_id) == ("openmpi", 3, 0)


def test_plan_modes_on_and_off():
  plan = distributed.make_plan(mode="on", environ={})
  assert plan.source == "cluster" and plan.multi_process      # TPU pods: JAX detects
  assert not distributed.make_plan(mode="off", environ=SLURM_ENV).multi_process
  with pytest.raises(ValueError, match=r"--num_processes given with --distributed=off"):
    distributed.make_plan(num_processes=2, mode="off", environ={})
  with pytest.raises(ValueError, match=r"--distributed='maybe'"):
    distributed.make_plan(mode="maybe", environ={})


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     r"--process_id=2 is out of range for --num_processes=2: ids are 0\.\.1"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1),
     r"--process_id=-1: process ids start at 0"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0),
     r"--num_processes=0: a run has at least 1 process"),
    (dict(num_processes=2, process_id=0),
     r"--num_processes, --process_id given without --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234"),
     r"given without --num_processes, --process_id"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0),
     r"--coordinator_address='localhost': expected host:port"),
    (dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0),
     r"port in 1\.\.65535"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0, timeout_s=0),
     r"--distributed_timeout=0"),
])
def test_plan_rejects_inconsistent_flags(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.make_plan(environ={}, **kwargs)


def test_plan_rejects_flags_that_contradict_the_cluster():
  with pytest.raises(ValueError, match=r"--num_processes=8 disagrees with SLURM_NTASKS=4"):
    distributed.make_plan(num_processes=8, environ=SLURM_ENV)
  with pytest.raises(ValueError, match=r"--process_id=0 disagrees with SLURM_PROCID=2"):
    distributed.make_plan(process_id=0, environ=SLURM_ENV)
  with pytest.raises(ValueError, match=r"SLURM_PROCID=5 is out of range for SLURM_NTASKS=4"):
    distributed.make_plan(environ=dict(SLURM_ENV, SLURM_PROCID="5"))
  with pytest.raises(ValueError, match=r"SLURM_NTASKS='four' is not an integer"):
    distributed.make_plan(environ=dict(SLURM_ENV, SLURM_NTASKS="four"))


def test_check_agreement_names_every_process():
  distributed.check_agreement(np.array([[2, 0], [2, 1]]), 2)
  with pytest.raises(ValueError, match=r"2 processes joined, launched as \[process 0: "
                     r"--num_processes=2 --process_id=0, process 1: --num_processes=3"):
    distributed.check_agreement(np.array([[2, 0], [3, 1]]), 2)
  with pytest.raises(ValueError, match="inconsistent process count or id"):
    distributed.check_agreement(np.array([[2, 1], [2, 1]]), 2)      # the same id twice


# ---------------------------------------------------------------------------------------
# The coordinator and the batch.
# ---------------------------------------------------------------------------------------


def test_unreachable_coordinator_is_named_within_the_timeout():
  address = f"127.0.0.1:{free_port()}"          # nothing listens there
  start = time.monotonic()
  with pytest.raises(distributed.CoordinatorUnreachableError,
                     match=rf"process 1 could not reach the coordinator at {address} "
                           r"within 1 s"):
    distributed.wait_for_coordinator(address, 1.0, process_id=1)
  assert time.monotonic() - start < 10
  # Something listening answers at once.
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    waited = distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5.0)
  assert waited < 5


def test_process_0_names_a_taken_coordinator_port():
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    with pytest.raises(ValueError, match=rf"--coordinator_address={address}: process 0 "
                       r"cannot listen on port \d+ .*choose a free port"):
      distributed.initialize(distributed.Plan("flags", address, 2, 0, timeout_s=5))


def test_unreachable_coordinator_from_the_command_line(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  result = subprocess.run(
      [sys.executable, "-m", "mmjax.main", "--config=tests/configs/tiny.py",
       f"--workdir={tmp_path}", f"--coordinator_address={address}", "--num_processes=2",
       "--process_id=1", "--distributed_timeout=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert f"could not reach the coordinator at {address} within 2 s" in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_global_batch_must_split_over_processes_and_devices(mesh8):
  distributed.check_global_batch(32, num_processes=2, devices_per_process=4)
  with pytest.raises(ValueError, match=r"batch_size 12 is not divisible by the 8 devices "
                     r"\(2 processes x 4 devices per process\).*--config.batch_size=16"):
    distributed.check_global_batch(12, num_processes=2, devices_per_process=4)
  with pytest.raises(ValueError, match=r"batch_size 6 is not divisible by the 4 devices of "
                     r"the mesh axis 'data' and the 2 processes"):
    distributed.check_global_batch(6, num_processes=2, devices_per_process=4,
                                   data_axis_size=4)
  # The trainer checks it before building anything.
  with pytest.raises(ValueError, match=r"batch_size 12 is not divisible by the 8 devices "
                     r"\(1 process x 8 devices per process\)"):
    experiment.check_config(tiny_config(batch_size=12), mesh_lib.make_mesh())


# ---------------------------------------------------------------------------------------
# Per-process input and the data-iterator state across process counts.
# ---------------------------------------------------------------------------------------


def test_processes_read_disjoint_shards_whose_union_is_the_global_batch():
  config = tiny_config()
  source = pipeline.make_source(config.data, "train")
  featurize = experiment.make_featurize(config)

  def stream(p, n):
    return iter(pipeline.train_dataset(source, featurize, seed=3, global_batch_size=16,
                                       process_index=p, process_count=n, num_threads=1))

  single = stream(0, 1)
  wholes = [next(single)["index"] for _ in range(3)]
  for n in (2, 4):
    parts = [stream(p, n) for p in range(n)]
    for whole in wholes:
      shards = [next(it)["index"] for it in parts]
      assert all(s.shape == (16 // n,) for s in shards)
      assert len(set(np.concatenate(shards).tolist())) == 16       # disjoint
      np.testing.assert_array_equal(np.concatenate(shards), whole)  # union, in order
    # Every process's iterator position counts global batches: the same on each, and
    # the same as one process's, which is what lets a run resume on another count.
    assert [it.get_state() for it in parts] == [single.get_state()] * n


def _write_data_states(workdir, step, states):
  manager = ckpt_lib.make_manager(workdir)
  data_dir = os.path.join(manager.directory, str(step), "data")
  os.makedirs(data_dir)
  for p, state in enumerate(states):
    with open(os.path.join(data_dir, f"process_{p}-of-{len(states)}.json"), "w") as f:
      json.dump(state, f)
  return manager


def test_resharded_data_state(tmp_path):
  manager = _write_data_states(str(tmp_path / "a"), 7, [{"next_index": 7}] * 2)
  assert ckpt_lib.resharded_data_state(manager, 7) == {"next_index": 7}
  manager = _write_data_states(str(tmp_path / "b"), 7,
                               [{"next_index": 7}, {"next_index": 6}])
  with pytest.raises(ValueError, match=r"saved by 2 processes whose data iterators are at "
                     r"different positions.*resume it on 2 processes"):
    ckpt_lib.resharded_data_state(manager, 7)
  with pytest.raises(ValueError, match="checkpoint step 3 .* has no data-iterator state"):
    ckpt_lib.resharded_data_state(manager, 3)


# ---------------------------------------------------------------------------------------
# Real two-process starts (no training): Slurm's variables, and inconsistent launches.
# ---------------------------------------------------------------------------------------

_JOIN = textwrap.dedent("""
    import sys
    import jax
    from mmjax.train import distributed
    n, pid = sys.argv[1], sys.argv[2]
    flags = {} if n == "-" else dict(coordinator_address=sys.argv[3],
                                     num_processes=int(n), process_id=int(pid))
    plan = distributed.make_plan(timeout_s=60, **flags)
    distributed.initialize(plan)
    print("joined", plan.source, jax.process_index(), jax.process_count(),
          jax.device_count(), flush=True)
""")


def _start_two(args_per_process, env_per_process):
  procs = []
  for args, extra_env in zip(args_per_process, env_per_process):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", **extra_env)
    procs.append(subprocess.Popen([sys.executable, "-c", _JOIN, *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return [p.returncode for p in procs], outs


def test_two_processes_join_through_slurm_variables():
  port = free_port()
  envs = [{"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
           "SLURM_LOCALID": str(i), "SLURM_STEP_NODELIST": "localhost",
           "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(port)} for i in (0, 1)]
  codes, outs = _start_two([["-", "-"]] * 2, envs)
  assert codes == [0, 0], outs
  assert "joined slurm 0 2 4" in outs[0] and "joined slurm 1 2 4" in outs[1], outs


def test_a_process_launched_with_another_count_is_an_error():
  address = f"127.0.0.1:{free_port()}"
  codes, outs = _start_two([["2", "0", address], ["3", "1", address]], [{}, {}])
  assert codes[0] != 0 and codes[1] != 0, outs
  for out in outs:
    assert ("inconsistent process count or id: 2 processes joined, launched as [process 0: "
            "--num_processes=2 --process_id=0, process 1: --num_processes=3 --process_id=1]"
            in out), out
