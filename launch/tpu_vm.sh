#!/usr/bin/env bash
# Runs a config on a Cloud TPU VM: one host (v5e-8) or a pod slice (every worker runs the same command; JAX finds
# its peers from the TPU metadata, so no --coordinator_address is needed). Needs the gcloud CLI and a project.
# Not exercised by the test suite (no TPU here); the multi-process path it relies on is (tests/test_train.py).
#
#   TPU_NAME=my-tpu ZONE=us-west4-a ACCELERATOR=v5litepod-16 bash launch/tpu_vm.sh create
#   TPU_NAME=my-tpu ZONE=us-west4-a BUCKET=my-bucket bash launch/tpu_vm.sh run configs/lm/shakespeare.py:gpu \
#       /mnt/bucket/runs/lm1 --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#   TPU_NAME=my-tpu ZONE=us-west4-a bash launch/tpu_vm.sh delete
#
# Every worker must see the same workdir: `run` mounts gs://$BUCKET at /mnt/bucket on each worker with gcsfuse
# (it must be on the VM image; see Cloud Storage FUSE's install notes) and the workdir lives there. data_dir may be a gs:// path (read through gcsfs).
# Rerunning the same `run` resumes from the latest checkpoint (e.g. after a preemption).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="${ACCELERATOR:?set ACCELERATOR}" \
      --version="${RUNTIME:-v2-alpha-tpuv5-lite}"
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$(dirname "$0")/.." "$TPU_NAME":foundation
    # The TPU build of jax, at the same version as requirements.txt (it brings the matching libtpu).
    ssh_all "cd foundation && bash launch/setup.sh && .venv/bin/pip install -q gcsfs \"jax[tpu]==\$(grep '^jax==' requirements.txt | cut -d= -f3)\""
    ;;
  run)
    config=${2:?config}; workdir=${3:?workdir}; shift 3
    ssh_all "sudo mkdir -p /mnt/bucket && sudo chown \$USER /mnt/bucket && (mountpoint -q /mnt/bucket || gcsfuse --implicit-dirs ${BUCKET:?set BUCKET} /mnt/bucket) \
      && cd foundation && .venv/bin/python -m foundation.main --config=$config --workdir=$workdir $*"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2
    ;;
esac
