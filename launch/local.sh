#!/usr/bin/env bash
# Runs one config on this machine (CPU or local GPUs), setting up first if needed:
#   bash launch/local.sh [CONFIG[:variant]] [WORKDIR] [--config.field=value ...]
# Defaults: the README's main job, configs/lm/shakespeare.py into workdirs/shakespeare (a variant adds its name:
# configs/lm/shakespeare.py:baby into workdirs/shakespeare_baby). Name the workdir to give overrides.
# Rerunning with the same workdir resumes from its latest checkpoint. With an NVIDIA GPU this is launch/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/lm/shakespeare.py}
name=$(basename "${config%%:*}" .py)
[[ "$config" == *:* ]] && name="${name}_${config#*:}"
workdir=${2:-workdirs/${name//,/_}}
for arg in "$config" "$workdir"; do
  if [[ "$arg" == -* ]]; then
    echo "error: $arg is in the place of CONFIG or WORKDIR; usage: bash launch/local.sh [CONFIG[:variant]] [WORKDIR]" \
         "[--config.field=value ...] (overrides come after both)." >&2
    exit 2
  fi
done
shift $(( $# < 2 ? $# : 2 ))
if command -v nvidia-smi >/dev/null; then
  exec bash launch/gpu.sh "$config" "$workdir" "$@"  # the CUDA build of jax; setup.sh installs the CPU one
fi
bash launch/setup.sh
if [ ! -e /dev/accel0 ] && [ ! -e /dev/vfio/0 ] && [[ "${XLA_FLAGS:-}" != *device_count* ]]; then  # no TPU (as host.py)
  # CPU only: one XLA device per core, trained data parallel. XLA runs each fused elementwise loop (augmentations,
  # norms, activations) on one thread per device, so splitting the batch over devices is what uses every core:
  # 1.85x on SimCLR's CNN, ~1.15x on the LM (benchmarks/README.md).
  export XLA_FLAGS="--xla_force_host_platform_device_count=$(nproc) ${XLA_FLAGS:-}"
fi
exec .venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@"
