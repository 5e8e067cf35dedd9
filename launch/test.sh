#!/usr/bin/env bash
# Runs the test suite on CPU with 8 fake devices (every sharding path is exercised), setting up first if needed.
# Extra arguments go to pytest, e.g. bash launch/test.sh -k sharding -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# tests/test_plan.py compiles for TPU slices and NVIDIA GPUs with XLA's TPU compiler (libtpu) and CUDA compiler (the
# jax CUDA plugin, nvcc), each installed apart from the environment so that nothing else loads it (foundation/plan.py).
for target in tpu gpu; do
  requirements=requirements-plan.txt
  [ "$target" = gpu ] && requirements=requirements-plan-gpu.txt
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ "$(cat ".venv/$target-compiler/.requirements.sha" 2>/dev/null)" != "$want" ]; then
    echo "[test] installing $requirements into .venv/$target-compiler"
    rm -rf ".venv/$target-compiler"
    .venv/bin/python -m pip install --quiet --no-deps --target ".venv/$target-compiler" -r "$requirements"
    echo "$want" > ".venv/$target-compiler/.requirements.sha"
  fi
done
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
# One worker more than there are cores (at most 4), each taking whole test files: XLA compiles on one thread, and a
# worker waiting on a subprocess, a checkpoint write or a poll leaves its core to another (2 cores, cold compilation
# cache, six of the end-to-end files: 3 workers 289 s, 2 workers 316 s). -n 0 runs in one process.
workers=$(( $(nproc) + 1 < 4 ? $(nproc) + 1 : 4 ))
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile tests "$@"
