"""Train-step throughput of each mesh layout, and the measured pipeline bubble.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_mesh.py

(run as a script it sets the flag itself). Prints one JSON line per result: tokens/s of the
sharded train step (llama_jax.train.train_step through llama_jax.sharding) relative to pure
data parallelism, and for pipeline schedules the bubble measured from the pipelined layer stack
next to the schedule's (S − 1) / (R·M + S − 1). On simulated CPU devices every "device" shares
the host's cores, so the numbers rank communication and schedule overheads, not real speed-ups.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX starts
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import model, optim, pipeline, sharding, train  # noqa: E402
from llama_jax.config import ModelConfig  # noqa: E402

MC = sharding.MeshConfig
CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=192,
                     max_seq_len=64, name="bench-mesh")
MESHES = {
    "data8": MC(8, 1, 1, 1), "data8-replicated": MC(8, 1, 1, 1, fsdp=False),
    "tensor8": MC(1, 1, 1, 8), "context8": MC(1, 1, 8, 1), "context8-ring": MC(
        1, 1, 8, 1, context_impl="ring"), "pipeline8": MC(1, 8, 1, 1, pipeline_microbatches=16),
    "d2-p2-c2": MC(2, 2, 2, 1), "d2-c2-t2": MC(2, 1, 2, 2), "p2-c2-t2": MC(1, 2, 2, 2),
}


def _batch(b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (b, t + 1), dtype=np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    ones = np.ones((b, t), np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos, segment_ids=ones,
                loss_mask=ones)


def _time(fn, steps: int) -> float:
    """Fastest of `steps` calls after one warm-up (compile) call: the host is shared, and the
    minimum is the least disturbed measurement."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def train_tokens_per_second(mc: MC, batch: int = 16, seq: int = 64, steps: int = 5) -> float:
    mesh = sharding.make_mesh(mc)
    graphdef, params = nnx.split(model.create(CONFIG, 0, *sharding.execution(mesh, mc)),
                                 nnx.Param)
    ocfg = optim.OptimConfig(peak_lr=1e-4, warmup_steps=0, total_steps=100)
    tx = optim.make_optimizer(ocfg, params)
    s = train.Step(graphdef, tx, optim.make_schedule(ocfg))
    sharding.check(mc, mesh, CONFIG, seq, batch)
    host = jax.tree.map(np.asarray, train.init_state(nnx.to_pure_dict(params), tx))
    state = sharding.put_state(host, sharding.state_shardings(host, params, mesh, mc.fsdp))
    step = sharding.jit_step(lambda st, b: train.train_step.__wrapped__(st, b, s), mesh, mc,
                             state, params, donate=False)
    with jax.set_mesh(mesh):
        data = sharding.shard_batch(_batch(batch, seq), mesh)
        seconds = _time(lambda: step(state, data)[1]["loss"], steps)
    return batch * seq / seconds


def measured_bubble(stages: int, repeats: int, microbatches: int, rows: int = 4,
                    seq: int = 64, steps: int = 10) -> float:
    """1 − (useful stage time) / (loop time) of the pipelined layers' forward pass.

    With microbatches of fixed size the loop takes c·(R·M + S − 1) + overhead; timing M and
    2M microbatches gives the per-slot time c, and the bubble is 1 − R·M·c / t(M). The two
    programs are timed alternately (fastest call of each), so a load spike on the shared host
    hits both. (The backward pass is left out: its timings vary too much for the difference.)
    """
    mesh = sharding.make_mesh(MC(-1, stages, 1, 1))
    llama = model.create(CONFIG, 0)
    graphdef, params = nnx.split(llama)

    def program(m):
        b = _batch(rows * m, seq)
        x = jnp.take(llama.embed[...], b["inputs"], axis=0)
        pos, seg = jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])

        def loss(params, x):
            out = pipeline.pipeline_layers(nnx.merge(graphdef, params), x, pos, seg, mesh=mesh,
                                           microbatches=m, repeats=repeats)
            return jnp.sum(out * out)
        f = jax.jit(loss)
        return lambda: f(params, x)
    with jax.set_mesh(mesh):
        one, two = program(microbatches), program(2 * microbatches)
        t1, t2 = float("inf"), float("inf")
        for _ in range(steps):
            t1, t2 = min(t1, _time(one, 1)), min(t2, _time(two, 1))
    per_slot = (t2 - t1) / (repeats * microbatches)
    return 1.0 - repeats * microbatches * per_slot / t1


def benchmark_meshes(meshes: dict[str, MC] | None = None, steps: int = 5,
                     bubbles=((4, 1, 4), (4, 2, 4), (4, 1, 8))) -> list[dict]:
    """One dict per mesh (tokens/s and the ratio to the first, pure data-parallel, entry) and
    per (S, R, M) pipeline schedule (measured and predicted bubble)."""
    results, base = [], None
    for name, mc in (meshes or MESHES).items():
        tps = train_tokens_per_second(mc, steps=steps)
        base = base or tps
        results.append(dict(bench="train_mesh", mesh=name, sizes=list(mc.sizes()),
                            tokens_per_s=round(tps, 1), vs_data_parallel=round(tps / base, 3)))
    for s, r, m in bubbles:
        results.append(dict(bench="pipeline_bubble", stages=s, repeats=r, microbatches=m,
                            measured=round(measured_bubble(s, r, m, steps=steps), 3),
                            predicted=round(pipeline.bubble_fraction(s, r, m), 3)))
    return results


if __name__ == "__main__":
    for row in benchmark_meshes():
        print(json.dumps(row), flush=True)
