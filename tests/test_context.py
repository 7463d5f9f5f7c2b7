"""Context-parallel attention (all-gather K/V and ring) against the unsharded attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention, sharding

B, T, N, K, H = 2, 16, 4, 2, 8


def test_load_balance_order_pairs_chunk_i_with_2c_minus_1_minus_i():
    order = np.asarray(attention.load_balance_order(16, 4))  # 8 chunks of 2 tokens
    per_rank = order.reshape(4, 4)  # contiguous split over 4 context ranks
    for i in range(4):
        assert set(per_rank[i] // 2) == {i, 7 - i}
    assert sorted(order) == list(range(16))
    with pytest.raises(ValueError, match="not divisible by 2 x context = 8"):
        attention.load_balance_order(12, 4)


def _inputs():
    """Two packed documents per row, padding at the end of row 1 and GQA heads."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    split = np.array([[5], [11]])
    idx = np.arange(T)[None, :]
    seg = np.where(idx < split, 1, 2)
    seg[1, -3:] = 0
    pos = np.where(idx < split, idx, idx - split)
    return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def _reference(q, k, v, pos, seg):
    return attention.dot_product_attention(q, k, v, attention.attention_mask(pos, seg, pos, seg))


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("sizes", [(2, 1, 4, 1), (1, 1, 2, 4)], ids=["cp4", "cp2-tp4"])
def test_context_parallel_attention_equals_unsharded(impl, sizes):
    mesh = sharding.make_mesh(sharding.MeshConfig(*sizes))
    q, k, v, pos, seg = _inputs()
    order = np.asarray(attention.load_balance_order(T, mesh.shape["context"]))
    perm = lambda a: a[:, order]  # noqa: E731 - the layout shard_batch feeds

    def loss(fn, q, k, v):  # a weighted sum, so every output element has its own gradient
        w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
        return jnp.sum(fn(q, k, v) * w)

    inverse = np.argsort(order)
    cp = lambda q, k, v: attention.context_parallel_attention(  # noqa: E731
        q, k, v, perm(pos), perm(seg), mesh=mesh, impl=impl)[:, inverse]
    with jax.set_mesh(mesh):
        out = jax.jit(cp)(perm(q), perm(k), perm(v))
        grads = jax.jit(jax.grad(lambda *a: loss(cp, *a), argnums=(0, 1, 2)))(
            perm(q), perm(k), perm(v))
    ref = _reference(q, k, v, pos, seg)
    ref_grads = jax.grad(lambda *a: loss(lambda q, k, v: _reference(q, k, v, pos, seg), *a),
                         argnums=(0, 1, 2))(q, k, v)
    live = np.asarray(seg != 0)  # padding queries' outputs are ignored downstream
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(ref)[live],
                               rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(perm(r)), rtol=1e-5, atol=1e-5)


def test_chunks_see_earlier_chunks_of_their_document_only():
    """Changing a key in document 2 changes no output of document 1 on any rank, and changing
    the last key of document 1 changes nothing before it (causality across chunks)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4, 1))
    q, k, v, pos, seg = _inputs()
    order = np.asarray(attention.load_balance_order(T, 4))
    fn = jax.jit(lambda v: attention.context_parallel_attention(
        q[:, order], k[:, order], v[:, order], pos[:, order], seg[:, order], mesh=mesh))
    with jax.set_mesh(mesh):
        base = np.asarray(fn(v))[:, np.argsort(order)]
        changed = np.asarray(fn(v.at[0, 10].add(1.0)))[:, np.argsort(order)]
    diff = np.abs(changed - base).max(axis=(2, 3))[0]  # row 0: doc 1 = 0..4, doc 2 = 5..15
    assert diff[:10].max() == 0 and diff[10:].min() > 0
