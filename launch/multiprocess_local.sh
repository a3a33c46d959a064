#!/usr/bin/env bash
# One training run as several JAX processes on this machine, each with its own
# simulated CPU devices: the multi-host code path (jax.distributed, per-process input,
# multi-host checkpoints, preemption agreement) without a cluster.
#
#   launch/multiprocess_local.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.x=y ...]
#
#   launch/multiprocess_local.sh 2 4 configs/default.py runs/mp2x4 --config.total_steps=20
#
# Process i runs `python -m mmjax.main --config=CONFIG --workdir=WORKDIR
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i [flags]` with
# XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS and
# JAX_PLATFORMS=cpu, so the run has N x DEVICES_PER_PROCESS devices. Process 0 hosts the
# coordinator, logs and writes the workdir (every process takes part in checkpoints);
# the output of the others is prefixed with "[process i]". Extra arguments go to every
# process.
#
# Each process's pid is printed as "launch: process i pid P" on stderr. SIGTERM or
# Ctrl-C to this script is passed to every process: they agree on a step, save a
# checkpoint there and exit 0; the same command resumes. SIGTERM to one process alone
# does the same (JAX's preemption service tells the others). If a process fails, the
# others are stopped and the script exits with the failing status.
#
# Environment:
#   PYTHON            interpreter (default: the repository's .venv/bin/python if it
#                     exists, else python3)
#   COORDINATOR_PORT  port on 127.0.0.1 for the coordinator (default: a free one)
#   STOP_GRACE_S      seconds the others get to exit after one fails (default 5)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

if [[ $# -lt 4 ]]; then
  echo "error: expected NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR, got $# argument(s)" >&2
  usage
fi
num_processes=$1
devices_per_process=$2
config=$3
workdir=$4
shift 4
for pair in "NUM_PROCESSES:$num_processes" "DEVICES_PER_PROCESS:$devices_per_process"; do
  name=${pair%%:*}
  value=${pair#*:}
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name must be a positive integer, got '$value'" >&2
    exit 2
  fi
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
port=${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cpu
# Replace any device count already in XLA_FLAGS (the last one would not reliably win).
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ //; s/ $//' \
  <<<"${XLA_FLAGS:-}")
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices_per_process"

echo "launch: $num_processes processes x $devices_per_process CPU devices," \
  "coordinator 127.0.0.1:$port, workdir $workdir" >&2
pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=("$PYTHON" -u -m mmjax.main "--config=$config" "--workdir=$workdir"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes"
       "--process_id=$i" "$@")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=($!)
  echo "launch: process $i pid $!" >&2
done

forward() {
  echo "launch: $1: passing SIGTERM to every process" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=
  rc=0
  wait -n -p finished "${running[@]}" || rc=$?
  if [[ -z $finished ]]; then
    continue    # a trapped signal interrupted the wait
  fi
  still=()
  for p in "${running[@]}"; do [[ $p != "$finished" ]] && still+=("$p"); done
  running=("${still[@]+"${still[@]}"}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    for ((i = 0; i < num_processes; i++)); do
      [[ ${pids[$i]} == "$finished" ]] && who=$i
    done
    echo "launch: process $who (pid $finished) exited with status $rc; stopping the others" >&2
    deadline=$((SECONDS + ${STOP_GRACE_S:-5}))
    for p in "${running[@]+"${running[@]}"}"; do
      while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
      kill -KILL "$p" 2>/dev/null || true
    done
  fi
done
exit $status
