"""Throughput benchmarks, printed as JSON lines (one per measurement).

    python tools/benchmark.py peak               # measured matmul peak of this machine
    python tools/benchmark.py forward            # jitted forward, bench shape, f32 and bf16
    python tools/benchmark.py train              # train step, bench shape, f32 and bf16
    python tools/benchmark.py train --mesh       # every mesh on 8 simulated CPU devices
    python tools/benchmark.py decode             # KV-cached decode, batch 1 and 8
    python tools/benchmark.py decode --decode_prompt=1500 --decode_new=64   # long context
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
if "--mesh" in sys.argv:  # simulated devices must be requested before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure.")
flags.DEFINE_integer("batch", 4, "Batch size (forward/train).")
flags.DEFINE_integer("seq_len", 512, "Sequence length (forward/train).")
flags.DEFINE_integer("iters", 10, "Timed iterations after warm-up.")
flags.DEFINE_string("model", "bench", "Model preset.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "train: the model's remat policy "
                  "(full lets the reference attention's scores fit at 8,192 tokens on a GPU; "
                  "MFU counts useful FLOPs only, so recomputation lowers it).")
flags.DEFINE_bool("mesh", False, "train: compare mesh layouts on 8 simulated CPU devices.")
flags.DEFINE_list("decode_batches", ["1", "8"], "decode: batch sizes.")
flags.DEFINE_integer("decode_prompt", 64, "decode: prompt tokens per row (the model's max_seq_len "
                     "is raised to fit prompt + new).")
flags.DEFINE_integer("decode_new", 128, "decode: new tokens per row.")
flags.DEFINE_enum("backend", "auto", ["auto", "plain", "cpu", "tpu", "gpu"],
                  "forward/train: the backend (mesh.backend of a training config).")
flags.DEFINE_enum("attention", "auto", ["auto", "full", "chunked", "reference", "splash",
                                        "pallas_gpu"],
                  "forward/train: the no-cache attention (mesh.attention of a training config).")
flags.DEFINE_enum("decode_attention", "auto", ["auto", "plain", "ragged_tpu", "ragged_gpu"],
                  "decode: attention over the KV cache (auto: the Pallas kernel on TPU/GPU).")
flags.DEFINE_bool("causal_blocks", True, "forward/train, cpu backend: let the full attention "
                  "skip the score blocks above the diagonal (false: whole [T, T]).")
flags.DEFINE_bool("attention_kernel", True, "forward/train, cpu backend: let bf16 self-attention "
                  "run the C++ kernel (backends/cpu/csrc/attention.cc) where it applies.")
flags.DEFINE_integer("peak_n", 0, "Side of the square matmul that measures the peak (0: 2048 on "
                     "CPU, 8192 on an accelerator, where 2048 is too small to fill the chip).")

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


def measure_peak(dtype: str, n: int = 0, iters: int = 10, rounds: int = 5) -> float:
    """Achieved GFLOP/s of one large jitted matmul: the ceiling MFU is reported against. The
    best of `rounds` medians of `iters` runs: on a shared VM one median read 835-1,708 GFLOP/s
    bf16 within an hour, and a peak caught in a slow spell would flatter every fraction."""
    import jax
    import jax.numpy as jnp
    n = n or FLAGS.peak_n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    # f32 accumulation: bf16 x bf16 -> f32 is what XLA:CPU runs on its bf16 kernels; a bf16
    # result makes it an f32 product (llama_jax/dense.py), i.e. not the machine's bf16 peak.
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    sec = min(_timeit(lambda: f(a).block_until_ready(), iters) for _ in range(rounds))
    return 2 * n ** 3 / sec / 1e9


def bench_backend():
    """The backend of --backend / --attention, with the cpu backend's switches applied."""
    import jax

    from llama_jax import backends
    name = FLAGS.backend
    if name == "cpu" or (name == "auto" and jax.default_backend() == "cpu"):
        from llama_jax.backends import cpu
        backend = cpu.make(causal_blocks=FLAGS.causal_blocks,
                           attention_kernel=FLAGS.attention_kernel)
        return backend.with_attention(FLAGS.attention)
    return backends.get(name, FLAGS.attention)


def bench_forward(dtype: str, peak_gflops: float, backend) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import llama_jax as lj
    from llama_jax import flops
    c = lj.get_config(FLAGS.model, dtype=dtype)
    graphdef, params = nnx.split(lj.create(c, backend=backend))
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


def bench_train(dtype: str, peak_gflops: float, backend) -> dict:
    """Steady-state train step (AdamW, donated state) on one fixed random batch."""
    import jax

    import llama_jax as lj
    from llama_jax import flops, train
    from tools import bench_setup
    c = lj.get_config(FLAGS.model, dtype=dtype, remat=FLAGS.remat)
    b, t = FLAGS.batch, FLAGS.seq_len
    step_fn, state, batch = bench_setup.train_setup(c, backend, b, t)
    state = {"s": state}

    def one():
        state["s"], metrics = train.train_step(state["s"], batch, step_fn)
        jax.block_until_ready(state["s"])

    one()  # compile
    sec = _timeit(one, FLAGS.iters)
    tok_s = b * t / sec
    gflops = tok_s * flops.train_flops_per_token(c, t) / 1e9
    return dict(bench="train", model=FLAGS.model, dtype=dtype, batch=b, seq_len=t,
                remat=c.remat, step_s=round(sec, 4), tokens_per_s=round(tok_s, 1), gflops=round(gflops, 1),
                peak_gflops=round(peak_gflops, 1), fraction_of_peak=round(gflops / peak_gflops, 3),
                jax=jax.__version__, device=jax.devices()[0].device_kind)


def _print(row: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"Usage: benchmark.py MODE [flags], MODE one of {', '.join(MODES)}.")
    mode = argv[1]
    from llama_jax import backends
    if mode != "convert":  # as the training launcher does (convert reports peak RSS)
        backends.prepare_host("auto")  # before JAX starts its CPU backend
    if mode == "train" and FLAGS.mesh:
        from tools import bench_mesh
        for row in bench_mesh.benchmark_meshes():
            _print(row)
        return
    if mode == "decode":
        import jax

        import llama_jax as lj
        from tools import bench_worker_decode as bwd
        config, bandwidth = lj.get_config(FLAGS.model), bwd.measure_bandwidth()
        need = FLAGS.decode_prompt + FLAGS.decode_new
        if need > config.max_seq_len:  # a longer context for the same weights
            config = lj.get_config(FLAGS.model, max_seq_len=1 << (need - 1).bit_length())
        model = lj.create(config)
        for dtype in (d for d in bwd.CASES if d in FLAGS.dtypes):
            for batch in map(int, FLAGS.decode_batches):
                _print(bwd.benchmark_decode(config, batch, FLAGS.decode_prompt, FLAGS.decode_new,
                                            dtype, model=model, bandwidth_gbs=bandwidth,
                                            decode_attention=FLAGS.decode_attention))
        return
    if mode == "convert":
        from tools import convert_checkpoint
        for row in convert_checkpoint.benchmark_convert():
            _print(row)
        return
    peaks = {dtype: measure_peak(dtype) for dtype in FLAGS.dtypes}
    for dtype in FLAGS.dtypes:
        if mode == "peak":
            _print(dict(bench="peak", dtype=dtype, gflops=round(peaks[dtype], 1)))
        elif mode in ("forward", "train"):
            bench = bench_forward if mode == "forward" else bench_train
            backend = bench_backend()
            _print(dict(bench(dtype, peaks[dtype], backend), backend=backend.name,
                        attention=FLAGS.attention, causal_blocks=FLAGS.causal_blocks,
                        attention_kernel=FLAGS.attention_kernel))


if __name__ == "__main__":
    from llama_jax import cli  # one `error:` line for a plain mistake

    cli.run(main)
