"""The train step the CPU benchmarks time, built one way for all of them (tools/benchmark.py
train, tools/bench_checksums.py, tools/bench_worker_train.py): AdamW with the backend's fused
update where it has one, state from train.init_params, one fixed batch of random tokens."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from llama_jax import optim, train
from llama_jax.model import abstract


def random_batch(vocab: int, rows: int, seq: int) -> dict[str, np.ndarray]:
    """One packed-free batch: `seq` random inputs and their next tokens per row (seed 1)."""
    ids = np.random.default_rng(1).integers(0, vocab, (rows, seq + 1), dtype=np.int32)
    return dict(inputs=ids[:, :-1], targets=ids[:, 1:],
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
                segment_ids=np.ones((rows, seq), np.int32),
                loss_mask=np.ones((rows, seq), np.int32))


def train_setup(config, backend, rows: int, seq: int):
    """(train.Step, TrainState, device batch) of `config` on `backend`."""
    graphdef, params = nnx.split(abstract(config, backend), nnx.Param)
    ocfg = optim.OptimConfig(peak_lr=1e-4, warmup_steps=0, total_steps=10**6)
    tx = optim.make_optimizer(ocfg, params)
    step_fn = train.Step(graphdef, tx, optim.make_schedule(ocfg),
                         fused_update=backend.fused_update and backend.fused_update(ocfg, params))
    state = train.init_state(train.init_params(config, 0), tx)
    return step_fn, state, jax.device_put(random_batch(config.vocab_size, rows, seq))
