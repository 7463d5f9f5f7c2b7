#!/usr/bin/env bash
# The default experiment on a fresh machine: installs what is missing (tools/install.sh), then
# trains experiments/configs/tiny.py into /tmp/llama_tiny (about 5 minutes on 2 CPU cores).
# Arguments go to experiments/train.py after those, e.g. --config.train.steps=600; rerunning
# resumes from the workdir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec .venv/bin/python experiments/train.py --config=experiments/configs/tiny.py \
  --workdir=/tmp/llama_tiny "$@"
