#!/usr/bin/env bash
# The package stands on its own: builds a wheel, installs it (not editable) into a fresh venv,
# and from a folder outside the checkout trains tiny.py:test for a few steps on the default
# corpus, once byte-level and once with a SentencePiece tokenizer trained at the start. The
# launcher and the config file are copied out, so nothing can come from the checkout; the
# output must not show libtpu's or TFDS's start-up notices. .ci/run calls it after the tests.
#
# The fresh venv borrows the dependencies of $PYTHON's environment (default .venv) through a
# .pth line instead of downloading them again; `pip check` verifies they satisfy the wheel's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" .
# Every non-Python source under llama_jax/ (the cpu backend's C++) must be in the wheel: a
# warm kernel cache would hide a missing one.
missing=$(git ls-files 'llama_jax/*.cc' 'llama_jax/*.h' | "$PYTHON" -c "
import sys, zipfile; names = set(zipfile.ZipFile(sys.argv[1]).namelist())
print(' '.join(p for p in sys.stdin.read().split() if p not in names))" "$tmp"/dist/llama_jax-*.whl)
if [ -n "$missing" ]; then echo "not in the wheel: $missing"; exit 1; fi
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
purelib "$PYTHON" > "$(purelib "$py")/borrowed_dependencies.pth"
"$py" -m pip install -q --no-deps --no-index "$tmp"/dist/llama_jax-*.whl
# Only the wheel's own requirements count: the fresh venv's bundled setuptools is older than
# what some borrowed packages ask for, which matters to none of them here.
if "$py" -m pip check | grep -i "^llama"; then exit 1; fi

mkdir "$tmp/run"
cp experiments/train.py experiments/configs/tiny.py "$tmp/run/"
cd "$tmp/run"
"$py" -c "import llama_jax, sys; f = llama_jax.__file__; sys.exit(0 if f.startswith('$tmp/venv/') else f'llama_jax came from {f}, not the wheel')"
train() {  # workdir, extra flags...
  local w=$1; shift
  "$py" train.py --config=tiny.py:test --workdir="$w" --config.train.steps=6 \
    --config.train.sample_tokens=4 --config.data.data_dir="$tmp/tfds" "$@" 2>&1 | tee "$w.log"
  grep -q "Exported parameters" "$w.log"
  if grep -E "host bounds|INVALID_ARGUMENT|Downloading and preparing|custom data configuration" "$w.log"; then
    echo "start-up notices in the output of the run in $w"
    exit 1
  fi
}
train bytes
train spm --config.data.tokenizer=train:512 --config.model.vocab_size=512
test -f spm/export/tokenizer.model
echo "wheel check passed: $(basename "$tmp"/dist/*.whl) trains outside the checkout"
