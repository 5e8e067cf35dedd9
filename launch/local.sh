#!/usr/bin/env bash
# Runs one config on this machine (CPU or local GPUs), setting up first if needed:
#   bash launch/local.sh [CONFIG[:variant]] [WORKDIR] [--config.field=value ...]
# Defaults: the README's main job, configs/lm/shakespeare.py into workdirs/shakespeare.
# Rerunning with the same workdir resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/lm/shakespeare.py}
workdir=${2:-workdirs/$(basename "${config%%:*}" .py)}
shift $(( $# < 2 ? $# : 2 ))
bash launch/setup.sh
if ! command -v nvidia-smi >/dev/null && [ ! -e /dev/accel0 ] && [[ "${XLA_FLAGS:-}" != *device_count* ]]; then
  # CPU only: one XLA device per core, trained data parallel. Small models' matmuls are too small to split well
  # across cores; splitting the batch instead was 1.4x faster here (benchmarks/). Not also single-threading the
  # devices (--xla_cpu_multi_thread_eigen=false, a further 8%): under load that once hung in an all-reduce.
  export XLA_FLAGS="--xla_force_host_platform_device_count=$(nproc) ${XLA_FLAGS:-}"
fi
exec .venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@"
