#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project and its test tools, and Fashion-MNIST from
# Debian's package where apt can install it (elsewhere the loader downloads it on first use).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch 2.13.0 (on this project's machines it lies on local disk); users with GPUs get CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# timm without its declared torchvision requirement (pyproject.toml lists its other requirements; docs/pretrained.md)
.venv/bin/python -m pip install -q --no-deps "timm>=1.0"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install dataset-fashion-mnist with apt; Fashion-MNIST will be downloaded on first use"
fi
echo "setup: done (.venv ready)"
