#!/usr/bin/env bash
# The test suite on a fresh machine: installs what is missing (tools/install.sh), then runs
# pytest (CPU, 8 simulated devices). Arguments go to pytest, e.g. -m "not slow" or a file.
# .ci/run calls exactly this. pytest's exit 5 (no test collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh || { echo "install failed"; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure"
  exit 1
fi
exit "$rc"
