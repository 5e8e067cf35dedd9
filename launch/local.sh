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
exec .venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@"
