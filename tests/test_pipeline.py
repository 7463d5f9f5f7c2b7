"""Pipeline schedules (GPipe, circular) against the plain layer loop and the one-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import attention, backends, model, pipeline, sharding, train
from mesh_setup import CFG, batches, reference, rel, run_sharded
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture


def test_bubble_fraction():
    assert pipeline.bubble_fraction(4, 1, 4) == pytest.approx(3 / 7)  # GPipe, M = S
    assert pipeline.bubble_fraction(4, 2, 4) == pytest.approx(3 / 11)  # circular halves it
    assert pipeline.bubble_fraction(1, 1, 8) == 0.0


@pytest.mark.parametrize("sizes, repeats, microbatches", [
    ((2, 4, 1, 1), 1, 4),   # GPipe, M = S
    ((1, 2, 1, 4), 2, 4),   # circular: 4 pieces of 2 layers, M > S
], ids=["gpipe", "circular"])
def test_pipelined_layers_equal_the_layer_loop(sizes, repeats, microbatches):
    """Forward and gradients of the pipelined stack equal model.forward_layers (no train
    step)."""
    mc = sharding.MeshConfig(*sizes, repeats=repeats, pipeline_microbatches=microbatches)
    mesh = sharding.make_mesh(mc)
    llama = model.create(CFG, 0)
    b = batches(1)[0]
    pos, seg = jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
    x = jnp.take(llama.embed[...], jnp.asarray(b["inputs"]), axis=0)
    graphdef, params = nnx.split(llama)

    def plain(params, x):
        m = nnx.merge(graphdef, params)
        return model.forward_layers(m.config, m.backend, nnx.state(m.layers), x, pos, seg)[0]

    def piped(params, x):
        return pipeline.pipeline_layers(nnx.merge(graphdef, params), x, pos, seg, mesh=mesh,
                                        repeats=repeats, microbatches=microbatches)

    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    value_grad = lambda f: jax.value_and_grad(lambda p, x: jnp.sum(f(p, x) * w), (0, 1))  # noqa
    ref = jax.jit(value_grad(plain))(params, x)
    with jax.set_mesh(mesh):
        got = jax.jit(value_grad(piped))(params, x)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    assert rel(got[1], ref[1]) <= 1e-5


def test_circular_pipeline_with_accumulation_remat_and_unrolled_layers():
    """The full train step: circular schedule (R 2, M 4) on 2 stages x 2 data x 2 tensor, two
    accumulation microbatches, full remat and unrolled layers, against one device."""
    config = CFG.replace(remat="full", scan_layers=False)
    mc = sharding.MeshConfig(2, 2, 1, 2, repeats=2, pipeline_microbatches=4)
    losses, params, _ = run_sharded(mc, steps=2, config=config, microbatches=2)
    ref_losses, ref_params = reference()
    np.testing.assert_allclose(losses, ref_losses[:2], rtol=1e-5)
    assert rel(params[1], ref_params[1]) <= 1e-5


def test_pipeline_context_chunked_attention_and_loss_equal_one_device(monkeypatch):
    """GPipe over 2 stages x context 2 x tensor 2 with the chunked attention (several key
    blocks: BLOCK 4) and the chunked loss (4 tokens per chunk), against one device: the
    memory-saving paths of the 405B recipes change nothing but memory."""
    monkeypatch.setattr(attention, "BLOCK", 4)
    monkeypatch.setattr(train, "LOSS_TOKENS", 4)
    mc = sharding.MeshConfig(1, 2, 2, 2, attention="chunked", pipeline_microbatches=4)
    losses, params, _ = run_sharded(mc, steps=2)
    ref_losses, ref_params = reference()
    np.testing.assert_allclose(losses, ref_losses[:2], rtol=1e-5)
    assert rel(params[1], ref_params[1]) <= 1e-5


@pytest.mark.slow
def test_pipeline_on_the_cpu_backend_at_256_token_rows():
    """data 4 x pipeline 2 with the cpu backend's attention at 256-token rows, where its causal
    query blocks (a lax.cond inside the stages' shard_map) switch on: equal to the plain
    backend on one device. (Its branches once differed in manual axis types and the step did
    not compile: experiments/configs/tiny.py with mesh.data=4, mesh.pipeline=2.)"""
    config = CFG.replace(n_layers=2, max_seq_len=256)
    cpu = backends.get("cpu")
    mc = sharding.MeshConfig(4, 2, 1, 1)
    losses, params, _ = run_sharded(mc, steps=1, config=config, backend=cpu, t=256)
    ref_losses, ref_params = reference(steps=1, t=256, config=config)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert rel(params[0], ref_params[0]) <= 1e-4
