#!/usr/bin/env bash
# One training run on every worker of a Cloud TPU VM pod slice (v4-32, v5e-64, ...):
# the same command on all workers through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh [--dry-run] [--setup] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#
#   launch/tpu_pod.sh --setup my-v4-32 us-central2-b configs/default.py /mnt/shared/runs/default
#   launch/tpu_pod.sh --dry-run my-v4-32 us-central2-b configs/default.py /mnt/shared/runs/default
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/default.py:fsdp /mnt/shared/runs/fsdp \
#       --config.batch_size=4096 --config.grad_cache.microbatches=4
#     (FSDP over every chip, GradCache in 4 chunks; docs/scaling.md)
#
# --setup first copies this checkout (`git archive HEAD`) to every worker and installs
# it there with `jax[tpu]`; without it the workers must already have it in REMOTE_DIR.
# The run is `cd REMOTE_DIR && python3 -m mmjax.main --distributed=on --config=CONFIG
# --workdir=WORKDIR [flags]` on every worker: --distributed=on makes each worker call
# jax.distributed.initialize(), which learns the workers and the coordinator from the
# TPU metadata server. CONFIG is a path inside REMOTE_DIR.
#
# WORKDIR must be one directory that every worker sees (an NFS/Filestore mount, or a
# bucket mounted with gcsfuse at the same path): every worker takes part in writing
# checkpoints, and worker 0 writes the logs, metrics and summary. Running the same
# command again resumes from the last checkpoint; on a preemption (SIGTERM) the workers
# agree on a step, save it and exit 0.
#
# --dry-run prints the gcloud commands, one per line, and runs nothing.
#
# Environment:
#   PROJECT      gcloud project (default: gcloud's configured one)
#   REMOTE_DIR   checkout on the workers, relative to the home directory (default mmjax)
#   JAX_TPU_PIN  the jax[tpu] requirement --setup installs (default "jax[tpu]>=0.10.2,<0.11")
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
setup=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    --help) usage ;;
    *) echo "error: unknown option $1 (options come before TPU_NAME)" >&2; usage ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  echo "error: expected TPU_NAME ZONE CONFIG WORKDIR, got $# argument(s)" >&2
  usage
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4

remote_dir=${REMOTE_DIR:-mmjax}
jax_pin=${JAX_TPU_PIN:-"jax[tpu]>=0.10.2,<0.11"}
gcloud_flags=("--zone=$zone")
if [[ -n ${PROJECT:-} ]]; then gcloud_flags+=("--project=$PROJECT"); fi

# A command line for a POSIX shell: words with special characters in single quotes.
quote() {
  local out="" word
  for word in "$@"; do
    if [[ -z $word || ! $word =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

run() {
  if ((dry_run)); then
    quote "$@"
    echo
  else
    "$@"
  fi
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ((setup)); then
  archive=${TMPDIR:-/tmp}/mmjax-src.tar.gz
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:mmjax-src.tar.gz" --worker=all \
    "${gcloud_flags[@]}"
  install=$(quote mkdir -p "$remote_dir")" && "$(quote tar -xzf mmjax-src.tar.gz -C "$remote_dir")
  install+=" && "$(quote python3 -m pip install -q -e "./$remote_dir" "$jax_pin")
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}" \
    "--command=$install"
fi

train="cd $(quote "$remote_dir") && "$(quote python3 -m mmjax.main --distributed=on \
  "--config=$config" "--workdir=$workdir" "$@")
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}" "--command=$train"
