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
# On CPU this runs on one XLA device whose ops use every core. One device per core (XLA_FLAGS=
# --xla_force_host_platform_device_count=N) was no faster once foundation/host.py tunes malloc, and two CPU devices
# can deadlock in an all-reduce when many steps are in flight (benchmarks/README.md).
exec .venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@"
