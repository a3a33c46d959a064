#!/usr/bin/env bash
# One training run on this machine, as one process driving all its devices (every
# GPU, the TPU chips of a single TPU VM, or the CPU).
#
#   launch/local.sh CONFIG WORKDIR [--config.x=y ...] [other mmjax.main flags]
#
#   launch/local.sh configs/default.py runs/default
#   launch/local.sh configs/default.py:runlocal /tmp/tiny --config.total_steps=50
#
# Runs `python -m mmjax.main --config=CONFIG --workdir=WORKDIR [flags]`. Running the
# same command again on a workdir with checkpoints resumes where it stopped; SIGTERM
# saves a checkpoint at the current step and exits 0 (Ctrl-C stops without saving; the
# last checkpoint is kept).
#
# Environment:
#   PYTHON       interpreter (default: the repository's .venv/bin/python if it exists,
#                else python3)
#   CPU_DEVICES  run on the CPU, split into this many simulated devices (to try the
#                multi-device code paths without accelerators)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  usage
fi
if [[ $# -lt 2 ]]; then
  echo "error: expected CONFIG WORKDIR, got $# argument(s)" >&2
  usage
fi
config=$1
workdir=$2
shift 2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n ${CPU_DEVICES:-} ]]; then
  if ! [[ $CPU_DEVICES =~ ^[1-9][0-9]*$ ]]; then
    echo "error: CPU_DEVICES must be a positive integer, got '$CPU_DEVICES'" >&2
    exit 2
  fi
  export JAX_PLATFORMS=cpu
  # Replace any device count already in XLA_FLAGS (the last one would not reliably win).
  xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ //;
                     s/ $//' <<<"${XLA_FLAGS:-}")
  export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$CPU_DEVICES"
fi
exec "$PYTHON" -m mmjax.main "--config=$config" "--workdir=$workdir" "$@"
