"""train.loss_fn projects a few tokens at a time: equal to the loss over the whole [B, T, V]
logits of the model's forward pass, in value and gradient, with and without z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import model, train
from llama_jax.config import ModelConfig
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=16, name="loss-test")


def _batch(b=3, t=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (b, t + 1), dtype=np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, -4:] = 0
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)), segment_ids=seg,
                loss_mask=seg.copy())


def _whole_logits_loss(params, graphdef, batch, z_loss):
    """The loss written out over the full logits (the form before chunking)."""
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"],
                                         batch["segment_ids"])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((log_z - target) * mask) + z_loss * jnp.sum(jnp.square(log_z) * mask)


@pytest.fixture(scope="module")
def setup():
    graphdef, params = nnx.split(model.create(CFG, 0), nnx.Param)
    batch = jax.tree.map(jnp.asarray, _batch())
    ref = jax.jit(jax.value_and_grad(
        lambda p: _whole_logits_loss(p, graphdef, batch, 1e-2)))(params)
    return graphdef, params, batch, ref


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("chunk", [4, 5], ids=["4-chunks", "divisor-2"])
def test_chunked_loss_equals_whole_logits(setup, chunk):
    graphdef, params, batch, (ref_value, ref_grads) = setup
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: train.loss_fn(p, graphdef, batch, 1e-2, chunk=chunk)[0]))(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel(g, r) <= 1e-6
    total, (ce, n) = jax.jit(lambda p: train.loss_fn(p, graphdef, batch, chunk=chunk))(params)
    assert float(n) == 3 * 16 - 4 and float(total) == float(ce) < float(value)
