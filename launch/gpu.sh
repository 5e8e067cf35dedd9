#!/usr/bin/env bash
# Runs a config on a GPU host: the CUDA build of the pinned jax for this host's driver (installed once into .venv),
# then one process that puts every local GPU in the mesh.
#   bash launch/gpu.sh CONFIG[:variant] WORKDIR [--config.field=value ...]
# Several hosts: run it on each with --coordinator_address=HOST:PORT --num_processes=N --process_id=I appended, or
# as the tasks of a SLURM step, one per host (srun --ntasks-per-node=1 bash launch/gpu.sh ...), where JAX reads them
# from SLURM itself.
# WORKDIR may be a gs:// URL (gcsfs is installed for it).
# Environment: CUDA_EXTRA=cuda12|cuda13 overrides the choice; DRY_RUN=1 prints the install and run commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash launch/gpu.sh CONFIG[:variant] WORKDIR [--config.field=value ...]}
workdir=${2:?usage: bash launch/gpu.sh CONFIG[:variant] WORKDIR [--config.field=value ...]}
shift 2
for arg in "$config" "$workdir"; do
  if [[ "$arg" == -* ]]; then
    echo "error: $arg is in the place of CONFIG or WORKDIR; overrides come after both." >&2
    exit 2
  fi
done
if [ -z "${CUDA_EXTRA:-}" ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "error: nvidia-smi is not on PATH: no NVIDIA driver here (set CUDA_EXTRA=cuda12 or cuda13 to choose)." >&2
    exit 2
  fi
  # The newest CUDA the driver supports, from nvidia-smi's banner ("CUDA Version: 12.4").
  # A failing nvidia-smi (a driver that is not loaded) must reach the error below, not end the script silently.
  cuda=$( (nvidia-smi 2>&1 || true) | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
  if [ -z "$cuda" ]; then
    echo "error: nvidia-smi does not report a CUDA version (is the driver loaded?); set CUDA_EXTRA=cuda12 or cuda13." >&2
    exit 2
  elif [ "$cuda" -ge 13 ]; then
    CUDA_EXTRA=cuda13
  elif [ "$cuda" -ge 12 ]; then
    CUDA_EXTRA=cuda12
  else
    echo "error: the driver supports CUDA $cuda; jax's CUDA builds need 12 or newer: update the driver." >&2
    exit 2
  fi
fi
case "$CUDA_EXTRA" in  # pip only warns about an extra that jax lacks, and would install no CUDA at all
  cuda12|cuda13) ;;
  *) echo "error: CUDA_EXTRA=$CUDA_EXTRA; choose cuda12 or cuda13." >&2; exit 2 ;;
esac
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
install=(.venv/bin/python -m pip install --quiet "jax[$CUDA_EXTRA]==$jax_version")
run=(.venv/bin/python -m foundation.main --config="$config" --workdir="$workdir" "$@")
# JAX hands a SLURM task only the GPU numbered by its SLURM_LOCALID (a task per GPU); this is one process per host,
# which drives every GPU the host gives it.
if [ -n "${SLURM_LOCALID:-}" ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  if [ "$SLURM_LOCALID" != 0 ]; then
    echo "error: SLURM started task $SLURM_LOCALID on this host, but launch/gpu.sh runs one process per host: use" \
      "srun --ntasks-per-node=1." >&2
    exit 2
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [ "$gpus" -gt 0 ]; then
    run=(env "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))" "${run[@]}")
  fi
fi
if [ -n "${DRY_RUN:-}" ]; then
  case "$workdir" in gs://*) echo ".venv/bin/python -m pip install --quiet -r requirements-gcs.txt" ;; esac
  printf '%q ' "${install[@]}"; echo
  printf '%q ' "${run[@]}"; echo
  exit 0
fi
# The tasks of a SLURM step (or several runs) on one host share this checkout: one sets up while the others wait.
exec 9>.setup.lock
flock 9
bash launch/setup.sh
case "$workdir" in gs://*) .venv/bin/python -m pip install --quiet -r requirements-gcs.txt ;; esac  # gcsfs
stamp=".venv/.jax-$CUDA_EXTRA-$jax_version"
if [ ! -f "$stamp" ]; then
  echo "[gpu] installing jax[$CUDA_EXTRA]==$jax_version"
  "${install[@]}"
  touch "$stamp"
fi
flock -u 9
exec 9>&-
exec "${run[@]}"
