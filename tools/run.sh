#!/usr/bin/env bash
# The default experiment on a fresh machine: installs what is missing (tools/install.sh), then
# trains experiments/configs/tiny.py into /tmp/llama_tiny (about 5 minutes on 2 CPU cores).
# Arguments go to experiments/train.py, e.g. --config.train.steps=600; --config=FILE[:ARG] and
# --workdir=DIR replace the defaults. Rerunning resumes from the workdir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
config=--config=experiments/configs/tiny.py
workdir=--workdir=/tmp/llama_tiny
for arg in "$@"; do
  case $arg in
    --config=*) config= ;;
    --workdir=*) workdir= ;;
  esac
done
exec .venv/bin/python experiments/train.py ${config:+"$config"} ${workdir:+"$workdir"} "$@"
