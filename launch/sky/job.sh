#!/usr/bin/env bash
# The setup and run steps of launch/sky/tpu.yaml and gpu.yaml, on every node (or TPU host) SkyPilot starts:
#   bash launch/sky/job.sh setup tpu|gpu   Python 3.11 by uv (TPU and GPU images ship 3.10), the pinned
#                                          requirements (launch/setup.sh), and for TPUs jax[tpu] at the pinned version
#   bash launch/sky/job.sh run tpu|gpu     trains CONFIG into /mnt/bucket/RUN, where the YAMLs' file_mounts mount
#                                          gs://BUCKET (SkyPilot installs gcsfuse and mounts it on every node)
# Environment (the YAMLs' envs): CONFIG, RUN, and ARGS: more flags as shell words, quotes kept, split by Python's
# shlex (nothing in them is executed: ARGS="--config.optim.freeze=\"('layers_0/',)\""). SkyPilot sets SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK and
# SKYPILOT_NODE_IPS: several GPU nodes become one JAX job through the coordinator flags; a TPU slice's hosts find
# each other themselves. A run that restarts (spot recovery) finds its checkpoints in the bucket and resumes.
# DRY_RUN=1 prints the commands, one per line, instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
step=${1:?usage: bash launch/sky/job.sh setup|run tpu|gpu}
kind=${2:?usage: bash launch/sky/job.sh setup|run tpu|gpu}
case "$kind" in tpu|gpu) ;; *) echo "error: the second argument is tpu or gpu, not '$kind'." >&2; exit 2 ;; esac

do_or_print() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$step" in
  setup)
    export PATH="$HOME/.local/bin:$PATH"
    if ! command -v uv >/dev/null && [ -z "${DRY_RUN:-}" ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi
    do_or_print uv python install 3.11
    python=$( [ -n "${DRY_RUN:-}" ] && echo python3.11 || uv python find 3.11 )
    do_or_print env PYTHON="$python" bash launch/setup.sh
    if [ "$kind" = tpu ]; then
      do_or_print .venv/bin/python -m pip install --quiet "jax[tpu]==$(sed -n 's/^jax==//p' requirements.txt)"
    fi
    ;;
  run)
    : "${CONFIG:?set CONFIG (--env CONFIG=configs/lm/shakespeare.py:large)}"
    : "${RUN:?set RUN, a directory in the bucket for the run (--env RUN=runs/lm)}"
    if [ -z "${DRY_RUN:-}" ] && ! mountpoint -q /mnt/bucket; then
      echo "error: /mnt/bucket is not mounted: launch with launch/sky/$kind.yaml, whose file_mounts mount gs://BUCKET there." >&2
      exit 2
    fi
    # The extra flags, split as the shell would split them by Python's shlex, then quoted again, so that nothing in
    # them ($(...), backquotes, globs) is run or expanded.
    quoted=$(python3 -c 'import shlex, sys
try:
  print(" ".join(map(shlex.quote, shlex.split(sys.argv[1]))))
except ValueError as e:
  sys.exit(f"error: ARGS is not a list of shell words ({e}): {sys.argv[1]}")' "${ARGS:-}")
    eval "set -- $quoted"
    if [ "$kind" = gpu ] && [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ]; then
      # The first line, without a pipe: under pipefail, `printf | head -n 1` fails (SIGPIPE, status 141) whenever
      # head exits before printf has written the other lines.
      head_ip=${SKYPILOT_NODE_IPS%%$'\n'*}
      set -- "$@" --coordinator_address="$head_ip:8476" --num_processes="$SKYPILOT_NUM_NODES" \
          --process_id="$SKYPILOT_NODE_RANK"
    fi
    if [ "$kind" = tpu ]; then
      do_or_print .venv/bin/python -m foundation.main --config="$CONFIG" --workdir="/mnt/bucket/$RUN" "$@"
    else
      do_or_print bash launch/gpu.sh "$CONFIG" "/mnt/bucket/$RUN" "$@"
    fi
    ;;
  *) echo "error: the first argument is setup or run, not '$step'." >&2; exit 2 ;;
esac
