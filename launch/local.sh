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
  # CPU only: one XLA device per core, trained data parallel. XLA runs each fused elementwise loop (augmentations,
  # norms, activations) on one thread per device, so splitting the batch over devices is what uses every core:
  # 1.85x on SimCLR's CNN, ~1.15x on the LM (benchmarks/README.md).
  export XLA_FLAGS="--xla_force_host_platform_device_count=$(nproc) ${XLA_FLAGS:-}"
fi
exec .venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@"
