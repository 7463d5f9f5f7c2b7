#!/usr/bin/env bash
# Installs llama-jax and its test references into .venv (Python 3.11+).
# torch is installed first, pinned to the 2.13.0 CPU build, so that nothing later pulls a CUDA
# build of several GB; everything else comes from setup.py's [test] extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import llama_jax, jax, flax, torch; print('llama_jax installed: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
