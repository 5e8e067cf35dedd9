#!/usr/bin/env bash
# Runs the test suite on CPU with 8 fake devices (every sharding path is exercised), setting up first if needed.
# Extra arguments go to pytest, e.g. bash launch/test.sh -k sharding -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
# One worker per core (at most 4), each taking whole test files: XLA compiles on one thread, so a second worker
# keeps the other core busy (cold compilation cache, 2 cores: 8-9 minutes instead of 10:54). -n 0 runs in one process.
workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile tests "$@"
