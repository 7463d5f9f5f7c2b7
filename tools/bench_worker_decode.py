"""Decode throughput of llama_jax: a peer_decode.py worker, and `benchmark_decode` for a table.

As a worker of ../shared/bench/peer_decode.py (its README: the job arrives in PEERBENCH_DECODE,
the checkpoint is the harness's Hugging Face directory, loaded with `llama_jax.load`):

    ~/.cache/peerbench/refvenv/bin/python ../shared/bench/peer_decode.py \
        --worker "ours=.venv/bin/python tools/bench_worker_decode.py"
    PEERBENCH_TURNS=2 PEERBENCH_STEPS=2 .venv/bin/python tools/bench_worker_decode.py  # standalone

The model runs on backends.get(LLAMA_JAX_BACKEND, default auto): the cpu backend's decode
kernels on a CPU host; `LLAMA_JAX_BACKEND=plain` measures the plain math.

Without PEERBENCH_DECODE the worker decodes random prompts with a random `bench` model.
Table mode, batch 1 and 8, f32 and bf16, next to the memory-bandwidth roofline:

    .venv/bin/python tools/bench_worker_decode.py --table
    .venv/bin/python tools/bench_worker_decode.py --ab    # weight layouts, same process

`--ab` times the decode loop with each `AB_LAYOUTS` layout of the same weights, interleaved
(order reversed every round), and prints the median per-round speed ratio against the first:
on a shared 2-core machine absolute tokens/s move with the load, ratios within a round less.

Times (generate's `timings`): ttft = prefill plus the first token; decode = the other
new - 1 tokens. Each step is one greedy `decode.generate` of all prompts, no EOS.

bf16 rows are held against the bf16 roofline (2 bytes per weight).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import llama_jax
from llama_jax import backends, decode


def measure_bandwidth(mbytes: int = 0, repeats: int = 5) -> float:
    """GB/s of an in-place jitted `x + 1` over `mbytes` MiB (read + write counted); by default
    512 MiB on CPU and 4 GiB on an accelerator (on an H200, 512 MiB read 2.76 TB/s, below the
    chip's bandwidth: f32 batch-8 decode reached 100% of that roofline)."""
    mbytes = mbytes or (512 if jax.default_backend() == "cpu" else 4096)
    x = jnp.zeros((mbytes * 2**20 // 4,), jnp.float32)
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = step(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = step(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best / 1e9


def roofline(config, batch: int, ctx: int, bytes_per_value: int, bandwidth_gbs: float) -> dict:
    """Bytes one decode step must read (every weight once, one embedding row per sequence, the
    K/V of ctx tokens per sequence) and the tokens/s that bandwidth allows."""
    c = config
    layer = c.dim * (c.n_heads + c.n_kv_heads) * c.head_dim * 2 + 3 * c.dim * c.ffn_dim + 2 * c.dim
    weights = (c.n_layers * layer + c.vocab_size * c.dim + c.dim + batch * c.dim) * bytes_per_value
    kv = batch * 2 * c.n_layers * c.n_kv_heads * c.head_dim * ctx * bytes_per_value
    return {"bytes_per_step": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "roofline_tok_s": batch * bandwidth_gbs * 1e9 / (weights + kv)}


def timed_generate(weights, prompts, new_tokens):
    """One greedy generation without stop ids: (output, ttft seconds, decode seconds)."""
    timings = {}
    out = decode.generate(weights, prompts, new_tokens, stop_ids=[], timings=timings)
    return out, timings["ttft"], timings["decode"]


def benchmark_decode(config, batch: int, prompt_len: int, new_tokens: int, dtype: str,
                     *, repeats: int = 5, bandwidth_gbs: float | None = None,
                     model=None, decode_attention: str = "auto") -> dict:
    """Greedy decode of `batch` random prompts of `prompt_len` tokens, `new_tokens` each,
    with the decode attention `decode_attention` (Backend.with_decode_attention).

    Returns medians of ttft_ms, decode_tok_s (tokens after the first), e2e_tok_s, and the
    roofline at the measured (or given) memory bandwidth with context prompt + new / 2.
    """
    model = on_backend(llama_jax.create(config) if model is None else model)
    model = llama_jax.with_backend(model, model.backend.with_decode_attention(decode_attention))
    weights = decode.prepare(decode.with_dtype(model, dtype))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, size=(batch, prompt_len)).tolist()
    timed_generate(weights, prompts, new_tokens)  # compile and warm up
    runs = [timed_generate(weights, prompts, new_tokens)[1:] for _ in range(repeats)]
    ttft, dec = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
    bw = bandwidth_gbs or measure_bandwidth()
    roof = roofline(config, batch, prompt_len + new_tokens // 2, jnp.dtype(dtype).itemsize, bw)
    dec_tok_s = batch * (new_tokens - 1) / dec
    return {"bench": "decode", "batch": batch, "prompt": prompt_len, "new": new_tokens,
            "dtype": dtype, "backend": weights.backend.name, "decode_attention": decode_attention,
            "ttft_ms": 1000 * ttft,
            "decode_tok_s": dec_tok_s,
            "e2e_tok_s": batch * new_tokens / (ttft + dec), "bandwidth_gbs": bw,
            "roofline_tok_s": roof["roofline_tok_s"],
            "frac_of_roofline": dec_tok_s / roof["roofline_tok_s"],
            "bytes_per_step": roof["bytes_per_step"], "device": jax.devices()[0].device_kind}


def worker():
    """The peerproto decode worker (see the module docstring)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
    import peerproto  # noqa: PLC0415 - lives beside the harness, on PYTHONPATH when it runs us

    prec = os.environ.get("PEERBENCH_PRECISION", "f32")
    dtype = "float32" if prec == "f32" else "bfloat16"
    job = json.loads(os.environ.get("PEERBENCH_DECODE", "null") or "null")
    if job is None:  # standalone: a random bench model
        config = llama_jax.get_config("bench")
        model = llama_jax.create(config)
        rng = np.random.default_rng(0)
        job = {"new": 128, "prompts": rng.integers(3, config.vocab_size, (1, 64)).tolist()}
    else:
        model = llama_jax.load(job["ckpt"])
    weights = decode.prepare(decode.with_dtype(on_backend(model), dtype))
    gate = peerproto.Gate(warmup_steps=int(os.environ.get("PEERBENCH_WARMUP", "1")),
                          info={"system": "llama-jax", "precision": prec,
                                "kv_bytes": jnp.dtype(dtype).itemsize})
    while True:
        gate.before_step()
        out, ttft, dec = timed_generate(weights, job["prompts"], job["new"])
        gate.after_step(extra={"ttft": ttft, "decode": dec, "tokens": out.ids(0)})


def on_backend(model):
    """The model on backends.get(LLAMA_JAX_BACKEND or auto)."""
    return llama_jax.with_backend(model, backends.get(os.environ.get("LLAMA_JAX_BACKEND",
                                                                     "auto")))


CASES = ("float32", "bfloat16")  # dtypes of the table


# (name, dtype, prepare kwargs) compared by --ab: "default" is the backend's decode kernels
# where it has them (the cpu backend's C++ kernels); the others the model's math on XLA's dots.
AB_LAYOUTS = (("f32 default", "float32", dict()),
              ("f32 XLA", "float32", dict(kernel=False)),
              ("bf16 default", "bfloat16", dict()),
              ("bf16 XLA", "bfloat16", dict(kernel=False)))


def compare_layouts(batch: int = 1, rounds: int = 15, new_tokens: int = 64):
    """Decode tokens/s of each AB_LAYOUTS layout, interleaved; ratios against the first."""
    config = llama_jax.get_config("bench")
    model = on_backend(llama_jax.create(config))
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, 64)).tolist()
    layouts = [(name, decode.prepare(decode.with_dtype(model, dt), **kw))
               for name, dt, kw in AB_LAYOUTS]
    for _, w in layouts:
        timed_generate(w, prompts, new_tokens)  # compile
    secs = {name: [] for name, _ in layouts}
    for r in range(rounds):
        for name, w in layouts[::1 if r % 2 == 0 else -1]:
            secs[name].append(timed_generate(w, prompts, new_tokens)[2])
    first = np.asarray(secs[layouts[0][0]])
    for name, _ in layouts:
        s = np.asarray(secs[name])
        print(json.dumps({"layout": name, "batch": batch,
                          "decode_tok_s": round(batch * (new_tokens - 1) / np.median(s), 1),
                          "speed_vs_first": round(float(np.median(first / s)), 3)}), flush=True)


def table():
    config = llama_jax.get_config("bench")
    bw = measure_bandwidth()
    model = llama_jax.create(config)
    print(json.dumps({"bandwidth_gbs": round(bw, 1)}), flush=True)
    for dtype in CASES:
        for batch in (1, 8):
            r = benchmark_decode(config, batch, 64, 128, dtype, bandwidth_gbs=bw, model=model)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    if "--ab" in sys.argv:
        for b in (1, 8):
            compare_layouts(batch=b)
    else:
        table() if "--table" in sys.argv else worker()
