#!/usr/bin/env bash
# Installs llama-jax (editable) and its test references into .venv (Python 3.11+); a second run
# returns at once unless setup.py or this script changed.
# torch is installed first, pinned to the 2.13.0 CPU build, so that nothing later pulls a CUDA
# build of several GB; everything else comes from setup.py's [test] extra. libtpu is not
# installed: add the plan extra (.venv/bin/pip install -e '.[plan]') to plan TPU targets.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.llama_jax_installed  # the hash of what the last install installed from
want=$(cat setup.py tools/install.sh | "$PYTHON" -c "import hashlib, sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest())")
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import llama_jax, jax, flax, torch; print('llama_jax installed: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
