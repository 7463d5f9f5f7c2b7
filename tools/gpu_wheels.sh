#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels tools/bench_gpu.sh installs on the device machine,
# which reaches no package registry: the packages llama_jax's benchmarks and GPU tests import
# that the device image (Python 3.12, JAX/Flax/Optax/Orbax, torch, pytest) lacks. Run here,
# where pip reaches the registry, then pass carry=[".whl"] to the device tool's run.
#
#   bash tools/gpu_wheels.sh            # about 3 MB
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# grain (train.py's input pipeline) and array-record are binary wheels: the device's Python.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 --implementation cp -d .whl \
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker
du -sh .whl && ls .whl
