"""Joining a multi-process run: when and how to call `jax.distributed.initialize`.

JAX's multi-controller runtime runs the same program in every process (one per TPU
VM host, one per GPU or per GPU node, or several on one machine with simulated CPU
devices); `jax.distributed.initialize` connects them through a coordinator (process
0). This module decides from the command line and the environment whether the run
has several processes, checks what it is given before JAX is asked (a misconfigured
launch otherwise hangs until a timeout and aborts with an RPC error), and checks
afterwards that every process agrees on the run's shape.

Sources, in order:
  * explicit flags `--coordinator_address`, `--num_processes`, `--process_id`
    (all three; `launch/multiprocess_local.sh` passes them);
  * Slurm (`srun`: SLURM_NTASKS > 1) and Open MPI (OMPI_COMM_WORLD_SIZE > 1), whose
    variables JAX reads itself;
  * `--distributed=on`: always initialise and let JAX detect the cluster (a Cloud TPU
    pod, whose workers learn the topology from the TPU metadata server;
    `launch/tpu_pod.sh` passes it).
`--distributed=off` never initialises. One process with none of these runs as before.

On CPU, collectives between processes need a CPU collectives implementation:
`jax_cpu_collectives_implementation='gloo'` is set before initialising.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from typing import Mapping

MODES = ("auto", "on", "off")
DEFAULT_TIMEOUT_S = 300
# Environment variables that say "several processes" and who sets them.
_SLURM_COUNT, _SLURM_ID, _SLURM_STEP = "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST"
_OMPI_COUNT, _OMPI_ID = "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"


class CoordinatorUnreachableError(ConnectionError):
  """No coordinator answered at the given address within the timeout."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process takes part in the run.

  `source` is 'single' (one process, nothing to initialise), 'flags', 'slurm',
  'openmpi' or 'cluster' (`--distributed=on`: JAX detects everything). Fields JAX
  detects itself are None.
  """
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S

  @property
  def multi_process(self) -> bool:
    return self.source != "single"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def parse_address(address: str, flag: str = "--coordinator_address") -> tuple[str, int]:
  """'host:port' or '[v6-host]:port' -> (host, port); ValueError naming `flag` otherwise."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{flag}={address!r}: expected host:port with a port in 1..65535 "
                     "(for example 127.0.0.1:12355)")
  return host.strip("[]"), int(port)


def make_plan(*, coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, mode: str = "auto",
              timeout_s: int = DEFAULT_TIMEOUT_S,
              environ: Mapping[str, str] | None = None) -> Plan:
  """Decides from flags and environment how this process joins the run.

  Args:
    coordinator_address: `host:port` of process 0's coordinator, or None.
    num_processes: the number of processes in the run, or None.
    process_id: this process's index in `[0, num_processes)`, or None.
    mode: 'auto' (initialise when flags or Slurm/Open MPI say several processes),
      'on' (always initialise; JAX detects what the flags leave unset) or 'off'.
    timeout_s: how long to wait for the coordinator and the other processes.
    environ: the environment (default `os.environ`).

  Returns:
    A `Plan`. Nothing is initialised here.

  Raises:
    ValueError: an unknown mode, only some of the three flags, a count below 1, an id
      outside `[0, num_processes)`, a malformed address, flags that contradict the
      cluster's environment, or flags together with `--distributed=off`.
  """
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  if not isinstance(timeout_s, int) or timeout_s <= 0:
    raise ValueError(f"--distributed_timeout={timeout_s!r}: expected a positive number of "
                     "seconds")
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  named = [k for k, v in given.items() if v is not None]
  if mode == "off":
    if named:
      raise ValueError(f"{', '.join(named)} given with --distributed=off; drop them or use "
                       "--distributed=auto")
    return Plan("single", timeout_s=timeout_s)

  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: a run has at least 1 process")
  if process_id is not None and process_id < 0:
    raise ValueError(f"--process_id={process_id}: process ids start at 0")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"--process_id={process_id} is out of range for --num_processes="
                     f"{num_processes}: ids are 0..{num_processes - 1}")
  if coordinator_address is not None:
    parse_address(coordinator_address)

  # What the cluster's environment says (the launcher set it for every process).
  cluster = None
  slurm_count = _env_int(environ, _SLURM_COUNT)
  ompi_count = _env_int(environ, _OMPI_COUNT)
  if slurm_count is not None and slurm_count > 1 and _SLURM_STEP in environ:
    cluster = ("slurm", _SLURM_COUNT, slurm_count, _SLURM_ID, _env_int(environ, _SLURM_ID))
  elif ompi_count is not None and ompi_count > 1:
    cluster = ("openmpi", _OMPI_COUNT, ompi_count, _OMPI_ID, _env_int(environ, _OMPI_ID))

  if cluster is not None:
    source, count_var, count, id_var, pid = cluster
    if num_processes is not None and num_processes != count:
      raise ValueError(f"--num_processes={num_processes} disagrees with {count_var}={count} "
                       f"set by {source}; drop the flag or fix the launch")
    if process_id is not None and pid is not None and process_id != pid:
      raise ValueError(f"--process_id={process_id} disagrees with {id_var}={pid} set by "
                       f"{source}; drop the flag or fix the launch")
    if pid is not None and not 0 <= pid < count:
      raise ValueError(f"{id_var}={pid} is out of range for {count_var}={count}")
    return Plan(source, coordinator_address, count, pid if process_id is None else process_id,
                timeout_s)

  if named and len(named) < 3 and mode != "on":
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(f"{', '.join(named)} given without {', '.join(missing)}: a multi-process "
                     "run outside Slurm, Open MPI or a TPU pod needs all three flags")
  if len(named) == 3:
    if num_processes == 1:
      return Plan("single", timeout_s=timeout_s)
    return Plan("flags", coordinator_address, num_processes, process_id, timeout_s)
  if mode == "on":
    return Plan("cluster", coordinator_address, num_processes, process_id, timeout_s)
  return Plan("single", timeout_s=timeout_s)


def wait_for_coordinator(address: str, timeout_s: float, *, process_id: int | None = None,
                         poll_s: float = 0.2) -> float:
  """Waits until something accepts TCP connections at `address`; returns the seconds it
  took.

  Process 0 starts the coordinator; the others may start first, so this polls.

  Raises:
    CoordinatorUnreachableError: nothing answered within `timeout_s`, naming the
      address.
  """
  host, port = parse_address(address)
  start = time.monotonic()
  last_error: OSError | None = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(poll_s, 0.05)):
        return time.monotonic() - start
    except OSError as e:
      last_error = e
    elapsed = time.monotonic() - start
    if elapsed >= timeout_s:
      who = f"process {process_id}" if process_id is not None else "this process"
      raise CoordinatorUnreachableError(
          f"{who} could not reach the coordinator at {address} within {timeout_s:g} s "
          f"(last error: {last_error}). Is process 0 running with the same "
          "--coordinator_address, and is that host and port reachable from here? "
          "Raise --distributed_timeout if process 0 starts late.")
    time.sleep(min(poll_s, max(timeout_s - elapsed, 0.0)))


def _check_port_free(address: str) -> None:
  """Process 0 binds the coordinator's port on every interface; say so if it is taken."""
  _, port = parse_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise ValueError(f"--coordinator_address={address}: process 0 cannot listen on port "
                       f"{port} ({e}); choose a free port") from None


def check_agreement(claims, num_processes: int) -> None:
  """Checks the (num_processes, process_id) every process was launched with.

  Args:
    claims: int [P, 2], row p = what process p was told (its count and its id), as
      gathered from every process.
    num_processes: the number of processes that actually joined.

  Raises:
    ValueError: a process was told another count, or the ids are not 0..P-1 each once.
  """
  rows = [(int(c), int(i)) for c, i in claims]
  counts = sorted({c for c, _ in rows})
  ids = sorted(i for _, i in rows)
  if counts != [num_processes] or ids != list(range(num_processes)):
    told = ", ".join(f"process {p}: --num_processes={c} --process_id={i}"
                     for p, (c, i) in enumerate(rows))
    raise ValueError(f"inconsistent process count or id: {num_processes} processes joined, "
                     f"launched as [{told}]; every process needs the same --num_processes "
                     "and its own --process_id in 0..num_processes-1")


def initialize(plan: Plan) -> None:
  """Initialises `jax.distributed` for a multi-process `plan` (nothing for 'single').

  Must run before anything touches a JAX backend. After JAX connects, checks that the
  run has the planned number of processes and that every process was launched with
  the same count and its own id.

  Raises:
    CoordinatorUnreachableError: a process other than 0 found no coordinator at the
      planned address within `plan.timeout_s`.
    ValueError: the port of process 0 is taken; the processes disagree on the count or
      ids (`check_agreement`).
  """
  if not plan.multi_process:
    return
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  timeout = plan.timeout_s
  if plan.coordinator_address is not None and plan.process_id is not None:
    if plan.process_id == 0:
      _check_port_free(plan.coordinator_address)
    else:
      waited = wait_for_coordinator(plan.coordinator_address, timeout,
                                    process_id=plan.process_id)
      timeout = max(1, math.ceil(timeout - waited))
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("joining a %s run: coordinator %s, process %s of %s (timeout %d s)",
               plan.source, plan.coordinator_address or "<detected>",
               plan.process_id if plan.process_id is not None else "<detected>",
               plan.num_processes or "<detected>", timeout)
  jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                             num_processes=plan.num_processes, process_id=plan.process_id,
                             initialization_timeout=timeout)
  count = jax.process_count()
  told_count = plan.num_processes if plan.num_processes is not None else count
  told_id = plan.process_id if plan.process_id is not None else jax.process_index()
  claims = multihost_utils.process_allgather(np.array([told_count, told_id], np.int32))
  check_agreement(np.asarray(claims).reshape(count, 2), count)


def is_main_process() -> bool:
  """True on process 0: the one that logs and writes files."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def check_global_batch(batch_size: int, *, num_processes: int, devices_per_process: int,
                       data_axis_size: int | None = None, mesh_shape=None) -> None:
  """The global batch must split evenly over processes and over the batch's devices.

  Args:
    batch_size: the global batch (`config.batch_size`).
    num_processes: processes in the run (`jax.process_count()`).
    devices_per_process: devices each process drives (`jax.local_device_count()`).
    data_axis_size: the number of devices the batch is split over (default: every
      device, `num_processes * devices_per_process`).
    mesh_shape: the mesh's {axis: size} (the batch is split over all its axes), for
      the message; its product is the number of devices the batch is split over.

  Raises:
    ValueError: naming the batch size, the processes x devices and a valid size.
  """
  total = num_processes * devices_per_process
  split = {a: s for a, s in dict(mesh_shape or {}).items() if s > 1}
  data = (total if data_axis_size is None else data_axis_size) if mesh_shape is None else (
      math.prod(dict(mesh_shape).values()))
  need = math.lcm(num_processes, data)
  if batch_size < 1 or batch_size % need:
    process_word = "process" if num_processes == 1 else "processes"
    shape = (f"the {total} devices ({num_processes} {process_word} x {devices_per_process} "
             "devices per process)" if data == total else
             f"the {data} devices of the mesh axis 'data' and the {num_processes} "
             f"{process_word}")
    if len(split) > 1 or (split and "data" not in split):
      shape += " (the batch is split over every mesh axis: " + " x ".join(
          f"{a}={s}" for a, s in split.items()) + ")"
    nearest = max(need, round(batch_size / need) * need)
    raise ValueError(f"batch_size {batch_size} is not divisible by {shape}; every device "
                     f"takes an equal share of the global batch (try --config.batch_size="
                     f"{nearest})")


def quiet_other_processes() -> None:
  """Logs INFO only from process 0; other processes keep warnings and errors."""
  if not is_main_process():
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
