#!/usr/bin/env bash
# From nothing to training on a Cloud TPU VM slice: prints (default) or runs (--run) the
# `gcloud compute tpus tpu-vm` commands of one step for one slice.
#
#   tools/tpu_vm.sh [--run] SLICE STEP
#
# SLICE (chips × hosts; the accelerator type gcloud is given):
#   v5e-1 v5e-4 v5e-8 v5e-16 v5e-32 v5e-64 v5e-256   v5litepod-N, runtime v2-alpha-tpuv5-lite
#   v6e-1 v6e-4 v6e-8 v6e-16 v6e-32 v6e-64 v6e-256   v6e-N, runtime v2-alpha-tpuv6e
#   v5p-8 v5p-16 v5p-32 v5p-64 v5p-128               v5p-N (N TensorCores = 2 per chip),
#                                                   runtime v2-alpha-tpuv5
#   v4-8 v4-16 v4-32 v4-64 v4-128                    v4-N (N TensorCores = 2 per chip),
#                                                   runtime tpu-ubuntu2204-base
# STEP, in order:
#   create    the TPU VM slice (SPOT=1: spot capacity)
#   install   this checkout (git archive of HEAD) on every host, Python 3.11 venv, -e . + jax[tpu]
#   mount     BUCKET at ~/bucket on every host with Cloud Storage FUSE (gcsfuse, installed first)
#   tiny      the tiny CPU experiment on the slice: every host, --distributed on several hosts
#   plan      tools/plan.py here (needs libtpu: pip install -e ".[plan]") for the Llama 3 8B run
#   data      DATA_DIR (a local folder of .jsonl/.txt) copied to ~/data on every host
#   convert   CHECKPOINT (Llama 3 8B, HF or Meta, on host 0) to a params export on the bucket
#   train8b   continued pretraining of Llama 3 8B from that export on ~/data, every host
#   ssh       a shell on host 0
#   delete    the slice
#
# Environment: TPU_NAME (default llama-jax-SLICE), ZONE (default: a zone that offers the
# generation; capacity varies, check yours), PROJECT (default: gcloud's configured project),
# BUCKET (a gs:// bucket name without the scheme; needed on several hosts), SPOT, DATA_DIR,
# CHECKPOINT, STEPS (train8b, default 1000), SEQ_LEN (train8b, default 8192).
#
# Dry run (default): one command per line, nothing executed, no gcloud needed. Plain mistakes end
# with one `error:` line on stderr and exit code 2.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

RUN=0
if [ "${1:-}" = "--run" ]; then RUN=1; shift; fi
[ $# -eq 2 ] || die "usage: tools/tpu_vm.sh [--run] SLICE STEP (e.g. tools/tpu_vm.sh v5e-8 create); see the comment at the top of the script"
SLICE=$1 STEP=$2

# --- The slice: accelerator type, runtime, chips, hosts and the planner's topology name.
gen=${SLICE%-*} n=${SLICE##*-}
declare -A TOPO2D=([1]=1x1 [4]=2x2 [8]=2x4 [16]=4x4 [32]=4x8 [64]=8x8 [256]=16x16)
declare -A TOPO3D=([4]=2x2x1 [8]=2x2x2 [16]=2x2x4 [32]=2x4x4 [64]=4x4x4)
case "$gen" in
  v5e|v6e)
    chips=$n topo=${TOPO2D[$n]:-} hosts=$(( (n + 7) / 8 ))  # 8 chips per host
    accel=$([ "$gen" = v5e ] && echo "v5litepod-$n" || echo "v6e-$n")
    runtime=$([ "$gen" = v5e ] && echo v2-alpha-tpuv5-lite || echo v2-alpha-tpuv6e)
    zone=$([ "$gen" = v5e ] && echo us-west4-a || echo us-east1-d) ;;
  v5p|v4)
    chips=$(( n / 2 )) topo=${TOPO3D[$(( n / 2 ))]:-} hosts=$(( (n / 2 + 3) / 4 ))  # 4 per host
    accel=$SLICE
    runtime=$([ "$gen" = v5p ] && echo v2-alpha-tpuv5 || echo tpu-ubuntu2204-base)
    zone=$([ "$gen" = v5p ] && echo us-east5-a || echo us-central2-b) ;;
  *) topo= ;;
esac
[ -n "$topo" ] || die "unknown slice $SLICE; use one of v5e-{1,4,8,16,32,64,256}, v6e-{1,4,8,16,32,64,256}, v5p-{8,16,32,64,128}, v4-{8,16,32,64,128}"

NAME=${TPU_NAME:-llama-jax-$SLICE}
ZONE=${ZONE:-$zone}
WHERE="--zone=$ZONE${PROJECT:+ --project=$PROJECT}"
TPU="gcloud compute tpus tpu-vm"
ALL="--worker=all"
if [ -n "${BUCKET:-}" ]; then
  RUNS='$HOME/bucket/llama-jax'  # expanded on the hosts
else
  [ "$hosts" -eq 1 ] || case "$STEP" in tiny|convert|train8b|mount)
    die "$SLICE has $hosts hosts, which must share their checkpoints: set BUCKET to a gs:// bucket name (and run the mount step)";; esac
  RUNS='$HOME/runs'
fi
DIST=$([ "$hosts" -gt 1 ] && echo " --distributed" || true)
EXPORT="$RUNS/llama3-8b-export"

# --- The commands of each step: one per line, as a shell would read them.
emit() { printf '%s\n' "$*"; }
step_commands() {
  case "$STEP" in
    create) emit "$TPU create $NAME $WHERE --accelerator-type=$accel --version=$runtime${SPOT:+ --spot}" ;;
    install)
      emit "git archive --format=tar.gz --output=/tmp/llama-jax.tar.gz HEAD"
      emit "$TPU scp /tmp/llama-jax.tar.gz $NAME:llama-jax.tar.gz $WHERE $ALL"
      emit "$TPU ssh $NAME $WHERE $ALL --command='set -e; sudo apt-get -qq update; sudo apt-get -qq install -y python3.11 python3.11-venv; mkdir -p llama-jax; tar -xzf llama-jax.tar.gz -C llama-jax; cd llama-jax; python3.11 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . \"jax[tpu]\"'" ;;
    mount)
      [ -n "${BUCKET:-}" ] || die "the mount step needs BUCKET (a gs:// bucket name without gs://)"
      emit "$TPU ssh $NAME $WHERE $ALL --command='set -e; command -v gcsfuse >/dev/null || { echo \"install Cloud Storage FUSE (gcsfuse) on the hosts first\" >&2; exit 2; }; mkdir -p \$HOME/bucket; gcsfuse --implicit-dirs --rename-dir-limit=1000000 ${BUCKET#gs://} \$HOME/bucket'" ;;
    tiny)
      emit "$TPU ssh $NAME $WHERE $ALL --command='cd llama-jax && .venv/bin/python experiments/train.py --config=experiments/configs/tiny.py --workdir=$RUNS/tiny$DIST --config.data.global_batch=$(( chips > 16 ? chips : 16 ))'" ;;
    plan) emit ".venv/bin/python tools/plan.py --config=experiments/configs/llama3_8b.py --target=$gen:$topo $(train8b_overrides)" ;;
    data)
      [ -n "${DATA_DIR:-}" ] || die "the data step needs DATA_DIR, a local folder of .jsonl or .txt files"
      emit "$TPU scp --recurse $DATA_DIR $NAME:data $WHERE $ALL" ;;
    convert)
      [ -n "${CHECKPOINT:-}" ] || die "the convert step needs CHECKPOINT, the Llama 3 8B directory (Hugging Face or Meta) on host 0"
      emit "$TPU ssh $NAME $WHERE --worker=0 --command='cd llama-jax && .venv/bin/python tools/convert_checkpoint.py --input=$CHECKPOINT --output=$EXPORT --to=orbax'" ;;
    train8b)
      emit "$TPU ssh $NAME $WHERE $ALL --command='cd llama-jax && .venv/bin/python experiments/train.py --config=experiments/configs/llama3_8b.py --workdir=$RUNS/llama3-8b-cpt$DIST $(train8b_overrides)'" ;;
    ssh) emit "$TPU ssh $NAME $WHERE --worker=0" ;;
    delete) emit "$TPU delete $NAME $WHERE --quiet" ;;
    *) die "unknown step $STEP; use create, install, mount, tiny, plan, data, convert, train8b, ssh or delete" ;;
  esac
}

# Continued pretraining: the export's weights, its tokenizer, one row per chip per step,
# a short warmup to a tenth of the pretraining peak, flash-style attention for 8k rows.
train8b_overrides() {
  printf '%s' "--config.train.init_from=$EXPORT --config.data.tokenizer=$EXPORT/tokenizer.model" \
    " --config.data.files=\"\$HOME/data/*.jsonl\" --config.data.seq_len=${SEQ_LEN:-8192}" \
    " --config.data.global_batch=$chips --config.train.steps=${STEPS:-1000}" \
    " --config.optim.peak_lr=3e-5 --config.optim.warmup_steps=50" \
    " --config.mesh.attention=chunked --config.train.checkpoint_every=200"
}

commands=$(step_commands)
if [ "$RUN" -eq 0 ]; then
  echo "# $SLICE: $accel, $chips chips on $hosts host(s), runtime $runtime, zone $ZONE (dry run; --run executes)"
  printf '%s\n' "$commands"
  exit 0
fi
if [ "$STEP" = plan ]; then
  cd "$(dirname "$0")/.."  # the plan runs here, from the checkout's root and its .venv
else
  command -v gcloud >/dev/null || die "gcloud is not installed; install the Google Cloud CLI and run gcloud init"
fi
while IFS= read -r line; do
  echo "+ $line" >&2
  eval "$line"
done <<< "$commands"
