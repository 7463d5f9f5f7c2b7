#!/usr/bin/env bash
# GPU benchmarks in one pass, for a machine whose image already has JAX with CUDA, Flax, Optax
# and Orbax (the rest travels as wheels in .whl/, and pure-Python packages without a wheel as
# copied package folders in .whl/py/). Use the image's Flax: flax 0.12.8 imports
# jax.experimental.hijax.HiPrimitive, which JAX 0.11.2 lacks (seen on the H200 image).
# Writes every line to $OUT/gpu_bench.jsonl (or ./ without OUT) and the console; each
# benchmark has its own time limit, so one stuck case leaves the rest.
#
#   bash tools/bench_gpu.sh [MODEL]        # MODEL: a preset, default llama3.2-1b
#   bash tools/bench_gpu.sh fused          # fused vs full attention (issue: accelerator
#                                          # attention), about 10 minutes; see below
#
# What runs: the measured matmul peak (bf16 and f32, 8192^3); AdamW train steps of MODEL
# against that peak on the plain backend (the model's own math; sequences of 2,048 tokens; bf16
# at batch 4 and 8 with the reference attention and at batch 8 with chunked attention; f32 at
# batch 4); greedy decode of MODEL at batch 1 and 8
# (prompt 64, 128 new tokens, bf16 and f32) against the measured memory bandwidth.
set -uo pipefail
model=${1:-llama3.2-1b}
out=${OUT:-.}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  cp -r .whl/py/* /tmp/site/ 2>/dev/null
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
run() {  # run LIMIT_S ARGS...: one benchmark.py mode, its JSON lines kept
  local limit=$1; shift
  timeout "$limit" python3 tools/benchmark.py "$@" 2> >(grep -v -E "^(W|I)[0-9]{4}" >&2) \
    | tee -a "$out/gpu_bench.jsonl"
  echo "# benchmark.py $* exited $?" | tee -a "$out/gpu_bench.jsonl"
}
if [ "$model" = fused ]; then
  # bf16 AdamW training of llama3.2-1b and -3b at 2,048 and 8,192 tokens per row: the gpu
  # backend's fused attention (Pallas GPU flash, mesh.attention=pallas_gpu) against the plain
  # backend's `reference` (whole [B, N, T, S] scores), MFU against the bf16 matmul peak each
  # process measures first; then bf16 decode of llama3.2-1b at batch 1 / 8 / 64 against the
  # measured HBM bandwidth (decode attention: kernel vs plain, and at 8,192 slots). Rows per
  # step: 8 x 2,048 or 2 x 8,192 (16k tokens) for 1b, half
  # that for 3b; `reference` at 8,192 tokens for 3b is left out (its scores alone exceed HBM).
  for args in "llama3.2-1b 8 2048 gpu pallas_gpu" "llama3.2-1b 8 2048 plain reference" \
      "llama3.2-1b 2 8192 gpu pallas_gpu" "llama3.2-1b 2 8192 plain reference" \
      "llama3.2-3b 4 2048 gpu pallas_gpu" "llama3.2-3b 4 2048 plain reference" \
      "llama3.2-3b 1 8192 gpu pallas_gpu"; do
    set -- $args
    run 100 train --model="$1" --dtypes=bfloat16 --batch="$2" --seq_len="$3" --backend="$4" \
      --attention="$5" --iters=5
  done
  run 120 decode --model=llama3.2-1b --dtypes=bfloat16 --decode_batches=1,8,64 \
    --decode_attention=plain
  # decode attention over a long cache (8,064-token prompts: 8,320 slots): the Pallas kernel
  # (ragged_gpu, split-K, reads each row's cache up to its length) against the plain einsum
  # over all slots with the [B, T, S] mask (batch 1 and 4: the prefill is the plain form either
  # way, and its f32 scores at batch 8 would be 70 GB); then the kernel at the short prompts
  for attn in ragged_gpu plain; do
    run 150 decode --model=llama3.2-1b --dtypes=bfloat16 --decode_batches=1,4 \
      --decode_prompt=8064 --decode_new=128 --decode_attention=$attn
  done
  run 100 decode --model=llama3.2-1b --dtypes=bfloat16 --decode_batches=1,8,64 \
    --decode_attention=ragged_gpu
  # the same with the whole decode loop captured as CUDA graphs (command buffers over while
  # loops and conditionals too): per-kernel launch overhead is the suspect of the 36-52% of
  # HBM bandwidth the H200 run read at batch 1 (unmeasured until this runs)
  echo "# decode with XLA command buffers over WHILE,CONDITIONAL" | tee -a "$out/gpu_bench.jsonl"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    run 120 decode --model=llama3.2-1b --dtypes=bfloat16 --decode_batches=1,8,64
  exit 0
fi
run 60 peak
for args in "bfloat16 4 reference" "bfloat16 8 reference" "bfloat16 8 chunked" \
    "float32 4 reference"; do
  set -- $args
  run 150 train --model="$model" --dtypes="$1" --batch="$2" --seq_len=2048 --attention="$3" --iters=5
done
run 180 decode --model="$model" --dtypes=bfloat16,float32 --decode_batches=1,8
