"""The tiny model, batches and train step shared by the sharding, pipeline and multi-host tests.

Sizes admit every factorisation of 8 devices over (data, pipeline, context, tensor): L 8 layers
(pipeline 8), N 8 heads (tensor 8; K 2 kv heads, replicated when tensor > 2), T 16 tokens
(2 x context 8), B 16 rows (data 8 with pipeline microbatches), V 64 (vocab-parallel).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import backends, model, optim, sharding, train
from llama_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=16, name="mesh-test")
B, T = 16, 16


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Compiling a step per layout dominates these tests, and XLA's optimisation passes are not
    what they check (the SPMD partitioning still runs): skipping them saves about a third."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def batches(n: int, seed: int = 0, b: int = B, t: int = T) -> list[dict[str, np.ndarray]]:
    """n packed batches: two documents per row (a split that moves with the row) and some
    padding, so document masks and positions matter across context chunks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, CFG.vocab_size, (b, t + 1), dtype=np.int32)
        split = rng.integers(2, t - 2, (b, 1))
        idx = np.arange(t)[None, :]
        seg = np.where(idx < split, 1, 2).astype(np.int32)
        seg[::3, -2:] = 0  # padding at the end of every third row
        pos = np.where(idx < split, idx, idx - split).astype(np.int32)
        out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos,
                        segment_ids=seg, loss_mask=(seg != 0).astype(np.int32)))
    return out


@functools.lru_cache(maxsize=None)  # one eager model init per process and config
def make_step(config: ModelConfig = CFG, microbatches: int = 1, lr: float = 1e-4):
    """(train.Step, initial TrainState as host numpy, logical axes) with the project's AdamW
    (clipping, decay mask). Adam's first step moves every weight by about ±lr whatever the size
    of its gradient, so a rounding-level gradient whose sign differs between layouts moves a
    weight by 2·lr: lr 1e-4 keeps that within 1e-5 of the parameter norm, and still moves the
    parameters by ~0.5% a step (asserted)."""
    graphdef, params = nnx.split(model.create(config, 0), nnx.Param)
    ocfg = optim.OptimConfig(peak_lr=lr, warmup_steps=0, total_steps=100)
    tx = optim.make_optimizer(ocfg, params)
    step = train.Step(graphdef, tx, optim.make_schedule(ocfg), microbatches=microbatches)
    state = train.init_state(nnx.to_pure_dict(params), tx)
    return step, jax.tree.map(np.asarray, state), params


def step_fn(s: train.Step, mesh=None, mc: sharding.MeshConfig | None = None,
            backend: backends.Backend = backends.PLAIN, config: ModelConfig = CFG):
    """The pure (state, batch) -> (state, metrics) of train.train_step for sharding.jit_step;
    with a mesh, its model runs as sharding.execution says for it, on `backend` (the plain
    one by default: the mesh tests check the core's math)."""
    if mesh is not None:
        graphdef = nnx.split(model.abstract(config, *sharding.execution(mesh, mc, backend)),
                             nnx.Param)[0]
        s = dataclasses.replace(s, graphdef=graphdef)
    return lambda state, batch: train.train_step.__wrapped__(state, batch, s)


def rel(a, b) -> float:
    """Largest per-array relative difference ‖a − b‖ / ‖b‖ over two trees."""
    return max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) /
                     max(np.linalg.norm(np.asarray(y)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def reference(steps: int = 3, t: int = T, config: ModelConfig = CFG):
    """Single-device train.train_step over batches(steps): (losses, host params after each)."""
    s, state, _ = make_step(config)
    state = jax.tree.map(jnp.asarray, state)
    losses, snapshots = [], []
    for b in batches(steps, t=t):
        state, metrics = train.train_step(state, jax.tree.map(jnp.asarray, b), s)
        losses.append(float(metrics["loss"]))
        snapshots.append(jax.tree.map(np.asarray, state.params))
    return losses, snapshots


@functools.lru_cache(maxsize=None)  # shared by the tests that compare with one layout
def run_sharded(mc: sharding.MeshConfig, steps: int = 3, config: ModelConfig = CFG,
                microbatches: int = 1, backend: backends.Backend = backends.PLAIN,
                t: int = T):
    """The same steps through sharding.jit_step on the mesh of `mc` (compiled once)."""
    s, state, params = make_step(config, microbatches)
    mesh = sharding.make_mesh(mc)
    data = batches(steps, t=t)
    sharding.check(mc, mesh, config, data[0]["inputs"].shape[1], data[0]["inputs"].shape[0])
    state = jax.device_put(state, sharding.state_shardings(state, params, mesh, mc.fsdp))
    step = sharding.jit_step(step_fn(s, mesh, mc, backend, config), mesh, mc, state, params)
    losses, snapshots = [], []
    with jax.set_mesh(mesh):
        for b in data:
            state, metrics = step(state, sharding.shard_batch(b, mesh))
            losses.append(float(metrics["loss"]))
            snapshots.append(jax.tree.map(np.asarray, state.params))
    return losses, snapshots, state
