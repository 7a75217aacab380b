#!/usr/bin/env bash
# Set up what the scripts need, idempotently: a virtual environment .venv with requirements.txt,
# and Fashion-MNIST from Debian's package dataset-fashion-mnist where apt-get can install it
# (otherwise the demo and tests use scikit-learn's digits and say so).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.txt into .venv (torch is large: a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$sudo" != none ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        dataset-fashion-mnist >/dev/null; } || true
  fi
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "setup: note: Fashion-MNIST (apt package dataset-fashion-mnist) is not available;" \
         "the demo and tests fall back to scikit-learn's 8x8 digits"
  fi
fi
