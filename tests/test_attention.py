"""Chunked (flash-style) and full (custom-VJP, materialised scores) attention against the
reference einsum attention: values and gradients, document masks, padding, GQA, key blocks
that do not divide S, queries against other keys, bf16, and inside the context-parallel
all-gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention, sharding
from llama_jax.backends.cpu import attention as cpu_attention

B, T, N, K, H = 2, 24, 4, 2, 8


def _inputs(t=T, s=None, dtype=jnp.float32, seed=0):
    """Packed rows: two documents each, padding at the end of row 1 (fully masked queries)."""
    s = s or t
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, N, H)) * 2, dtype)
    k = jnp.asarray(rng.normal(size=(B, s, K, H)) * 2, dtype)
    v = jnp.asarray(rng.normal(size=(B, s, K, H)), dtype)
    split = np.array([[5], [s // 2 + 1]])
    idx = np.arange(s)[None, :]
    seg = np.where(idx < split, 1, 2)
    seg[1, -3:] = 0
    pos = np.where(idx < split, idx, idx - split)
    return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def _loss(fn):
    """A weighted sum, so every output element has its own gradient."""
    def f(q, k, v):
        out = fn(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w)
    return f


@pytest.mark.parametrize("block", [8, 7, 512], ids=["3-blocks", "divisor-6", "one-block"])
def test_chunked_equals_reference_with_gradients(block):
    q, k, v, pos, seg = _inputs()
    ref_fn = lambda q, k, v: attention.reference_attention(q, k, v, pos, seg)  # noqa: E731
    fn = lambda q, k, v: attention.chunked_attention(q, k, v, pos, seg, block=block)  # noqa
    out, ref = jax.jit(fn)(q, k, v), ref_fn(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(_loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries", ["all", "last-16"])
def test_full_equals_reference_with_gradients(queries):
    """The default training attention: same values and gradients as autodiff of the einsums,
    including fully masked padding queries and local queries against a longer key set."""
    q, k, v, pos, seg = _inputs(t=32)
    qs, ps, ss = (q, pos, seg) if queries == "all" else (q[:, 16:], pos[:, 16:], seg[:, 16:])
    ref_fn = lambda q, k, v: attention.reference_attention(q, k, v, ps, ss, pos, seg)  # noqa
    fn = lambda q, k, v: cpu_attention.materialized_attention(q, k, v, ps, ss, pos, seg)  # noqa
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(qs, k, v)), np.asarray(ref_fn(qs, k, v)),
                               rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(qs, k, v)
    ref_grads = jax.grad(_loss(ref_fn), argnums=(0, 1, 2))(qs, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["in-order", "permuted"])
def test_full_causal_blocks_equal_reference_with_gradients(order):
    """Self-attention over 256 tokens runs as two query blocks (the upper-right score block
    skipped) when the mask allows it, and as the whole computation when it does not (a
    permuted row): both equal the reference in value and gradient, padding queries included
    (here also inside the first block, where the blocked path must still average all keys)."""
    t = 256
    assert cpu_attention.query_block(t) == 128 and cpu_attention.query_block(128) == 0
    q, k, v, pos, seg = _inputs(t=t, seed=1)
    seg = seg.at[0, 40:44].set(0)
    if order == "permuted":
        perm = np.random.default_rng(2).permutation(t)
        q, k, v, pos, seg = q[:, perm], k[:, perm], v[:, perm], pos[:, perm], seg[:, perm]
    mask = attention.attention_mask(pos, seg, pos, seg)
    assert bool(cpu_attention._in_order(mask, 128)) == (order == "in-order")
    ref_fn = lambda q, k, v: attention.reference_attention(q, k, v, pos, seg)  # noqa: E731
    fns = [lambda q, k, v: cpu_attention.materialized_attention(q, k, v, pos, seg)]
    if order == "in-order":  # the blocked computation itself, without the cond around it
        def blocked(q, k, v):
            keys = (pos, seg, pos, seg)

            @jax.custom_vjp
            def f(q, k, v):
                return f_fwd(q, k, v)[0]

            def f_fwd(q, k, v):
                q5, k_h, v_h = cpu_attention._layouts(q, k, v)
                out, probs = cpu_attention._blocked_forward(q5, k_h, v_h, *keys, 128, (128, 256),
                                                        q.dtype)
                return out, (q5, k_h, v_h, probs, out)

            def f_bwd(res, d_out):
                return cpu_attention._blocked_backward(*res, *keys, 128, d_out)
            f.defvjp(f_fwd, f_bwd)
            return jnp.where((seg == 0)[:, :, None, None], ref_fn(q, k, v), f(q, k, v))
        fns.append(blocked)
    ref = ref_fn(q, k, v)
    ref_grads = jax.grad(_loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for fn in fns:
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), np.asarray(ref),
                                   rtol=1e-5, atol=1e-6)
        grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_full_bf16_gradients_within_rounding():
    """bf16 inputs: the gradients (probabilities kept in bf16 for the backward) stay within
    bf16 rounding of the f32 reference's."""
    q, k, v, pos, seg = _inputs(t=32)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    fn = lambda q, k, v: cpu_attention.materialized_attention(q, k, v, pos, seg)  # noqa: E731
    ref_fn = lambda q, k, v: attention.reference_attention(q, k, v, pos, seg)  # noqa: E731
    grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(bf(q), bf(k), bf(v))
    ref_grads = jax.grad(_loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        scale = float(np.abs(np.asarray(r)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=0.03 * scale)


def test_chunked_is_causal_and_keeps_documents_apart():
    """Changing key 10 (document 2 of row 0) changes no earlier query and no query of
    document 1; every later query of document 2 changes."""
    q, k, v, pos, seg = _inputs()
    fn = jax.jit(lambda v: attention.chunked_attention(q, k, v, pos, seg, block=8))
    diff = np.abs(np.asarray(fn(v.at[0, 10].add(1.0)) - fn(v))).max(axis=(2, 3))[0]
    assert diff[:10].max() == 0 and diff[10:].min() > 0


def test_chunked_queries_against_other_keys_bf16():
    """Local queries against a longer key set (the all-gather case), in bf16: within bf16
    rounding of the f32 reference."""
    q, k, v, pos, seg = _inputs(t=32)
    qs, ps, ss = q[:, 16:], pos[:, 16:], seg[:, 16:]
    ref = attention.reference_attention(qs, k, v, ps, ss, pos, seg)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    out = jax.jit(lambda q, k, v: attention.chunked_attention(q, k, v, ps, ss, pos, seg,
                                                              block=8))(bf(qs), bf(k), bf(v))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)


def test_chunked_inside_context_parallel_all_gather():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4, 1))
    q, k, v, pos, seg = _inputs(t=16)
    order = np.asarray(attention.load_balance_order(16, 4))
    inverse = np.argsort(order)
    perm = lambda a: a[:, order]  # noqa: E731

    def cp(local):
        return lambda q, k, v: attention.context_parallel_attention(
            perm(q), perm(k), perm(v), perm(pos), perm(seg), mesh=mesh, local=local)[:, inverse]
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(_loss(cp(attention.chunked_attention)), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.value_and_grad(_loss(cp(attention.reference_attention)), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        want = jax.jit(ref)(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_chunked_keeps_no_score_matrix_for_the_backward():
    """The residuals of the chunked forward are q, k, v, the output and the log-sum-exp: no
    [B, N, T, S] array, unlike the reference's saved probabilities."""
    q, k, v, pos, seg = _inputs(t=64)
    scores = B * N * 64 * 64

    def residual_sizes(fn):
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pos, seg), q, k, v)
        return [x.size for x in jax.tree.leaves(vjp) if hasattr(x, "size")]
    chunked = lambda *a: attention.chunked_attention(*a, block=16)  # noqa: E731
    assert max(residual_sizes(chunked)) < scores
    assert max(residual_sizes(attention.reference_attention)) >= scores
