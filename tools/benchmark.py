"""Throughput benchmarks, printed as JSON lines (one per measurement).

    python tools/benchmark.py peak               # measured matmul peak of this machine
    python tools/benchmark.py forward            # jitted forward, bench shape, f32 and bf16
    python tools/benchmark.py train              # train step, bench shape, f32 and bf16
    python tools/benchmark.py decode             # KV-cached decode, batch 1 and 8
    python tools/benchmark.py convert            # HF -> Orbax and Meta -> Orbax MB/s, peak RSS

The bench shape is that of ../shared/bench (d_model 512, 8 layers, 8 heads, 2 kv heads, ffn
1408, vocab 8192, seq 512, batch 4; `llama_jax.get_config("bench")`). Utilisation is reported
against the matmul peak measured in the same process (`peak`), never a datasheet number. Speed
claims against the peers (HF torch, MaxText, llama.cpp) come from ../shared/bench, which runs
them side by side with tools/bench_worker_*.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure.")
flags.DEFINE_integer("batch", 4, "Batch size (forward/train).")
flags.DEFINE_integer("seq_len", 512, "Sequence length (forward/train).")
flags.DEFINE_integer("iters", 10, "Timed iterations after warm-up.")
flags.DEFINE_string("model", "bench", "Model preset.")

MODES = ("peak", "forward", "train", "decode", "convert")


def _timeit(fn, iters):
    """Median seconds of `fn()` (which must block) over `iters` runs after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_peak(dtype: str, n: int = 2048, iters: int = 10) -> float:
    """Achieved GFLOP/s of one large jitted matmul: the ceiling MFU is reported against."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    sec = _timeit(lambda: f(a).block_until_ready(), iters)
    return 2 * n ** 3 / sec / 1e9


def bench_forward(dtype: str, peak_gflops: float) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import llama_jax as lj
    from llama_jax import flops
    c = lj.get_config(FLAGS.model, dtype=dtype)
    graphdef, params = nnx.split(lj.create(c))
    tokens = jax.random.randint(jax.random.key(1), (FLAGS.batch, FLAGS.seq_len), 0, c.vocab_size)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    sec = _timeit(lambda: fwd(params, tokens).block_until_ready(), FLAGS.iters)
    tok_s = FLAGS.batch * FLAGS.seq_len / sec
    gflops = tok_s * flops.forward_flops_per_token(c, FLAGS.seq_len) / 1e9
    return dict(bench="forward", model=FLAGS.model, dtype=dtype, batch=FLAGS.batch,
                seq_len=FLAGS.seq_len, step_s=round(sec, 4), tokens_per_s=round(tok_s, 1),
                gflops=round(gflops, 1), peak_gflops=round(peak_gflops, 1),
                fraction_of_peak=round(gflops / peak_gflops, 3), jax=jax.__version__,
                device=jax.devices()[0].device_kind)


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"Usage: benchmark.py MODE [flags], MODE one of {', '.join(MODES)}.")
    mode = argv[1]
    if mode == "decode":
        from tools import bench_worker_decode
        for row in bench_worker_decode.benchmark_rows(FLAGS.dtypes):
            print(json.dumps(row), flush=True)
        return
    if mode == "convert":
        from tools import convert_checkpoint
        for row in convert_checkpoint.benchmark_convert():
            print(json.dumps(row), flush=True)
        return
    peaks = {}
    for dtype in FLAGS.dtypes:
        peaks[dtype] = measure_peak(dtype)
        if mode == "peak":
            print(json.dumps(dict(bench="peak", dtype=dtype, gflops=round(peaks[dtype], 1))),
                  flush=True)
    if mode == "forward":
        for dtype in FLAGS.dtypes:
            print(json.dumps(bench_forward(dtype, peaks[dtype])), flush=True)
    elif mode == "train":
        from tools import bench_worker_train
        for dtype in FLAGS.dtypes:
            row = bench_worker_train.benchmark_train(FLAGS.model, dtype, FLAGS.batch,
                                                     FLAGS.seq_len, FLAGS.iters)
            row["peak_gflops"] = round(peaks[dtype], 1)
            row["fraction_of_peak"] = round(row["gflops"] / peaks[dtype], 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
