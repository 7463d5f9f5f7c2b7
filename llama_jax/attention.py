"""Attention behind one function, with document (segment) masks and explicit positions.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query heads
per kv head, H head dim.

Masks are built from positions and segment ids rather than from array indices, so one rule
serves packed training rows, right-padded prompt batches and a KV cache whose slots are filled
out of order: query (t, segment a, position p) sees key (s, segment b, position r) iff a == b,
b != 0 (0 marks padding / empty cache slots) and r <= p. Within one document positions grow
with the index, so this is the usual causal mask; across documents nothing is visible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np



def attention_mask(q_pos, q_seg, k_pos, k_seg):
    """Boolean [B, T, S] mask: same non-zero segment and key position <= query position."""
    same_doc = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return same_doc & causal


def dot_product_attention(q, k, v, mask):
    """Reference einsum attention with grouped-query heads.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool. Returns [B, T, N, H].
    Logits and softmax are computed in float32 whatever the compute dtype (as Hugging Face
    and Meta do), then probabilities are cast back for the value product.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    # A large finite negative rather than -inf: fully masked rows (padding queries) then give a
    # uniform distribution instead of NaN, and their outputs are ignored downstream.
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------
# Memory-efficient attention for training: the online softmax of flash attention (Dao et al.
# 2022, Algorithm 1; Milakov & Gimelshein 2018) over blocks of keys, in plain JAX, with a
# custom_vjp whose residuals are only q, k, v, the output and the softmax statistics [B, N, T]:
# the backward recomputes each block's scores (Dao et al. Algorithm 2). No [T, S] array is ever
# whole: at most [B, N, T, block] scores live at once, so a 131k-key context-parallel gather
# or an 8k-token training row costs O(T · block), not O(T · S). Same mask rule and the same
# fully-masked-row convention (uniform over all keys) as `dot_product_attention`.

BLOCK = 512  # keys per block: [B, N, T, 512] f32 scores; a divisor of S is used if needed


def _key_blocks(s: int, block: int) -> int:
    """Key block size: `block`, or the largest divisor of S below it (no padded keys, so a
    fully masked row stays uniform over exactly S keys, as in the reference)."""
    block = min(block, s)
    while s % block:
        block -= 1
    return block


def _blocked(a, block):
    """[B, S, ...] -> [S/block, B, block, ...]: the scan axis first."""
    return a.reshape(a.shape[0], a.shape[1] // block, block, *a.shape[2:]).swapaxes(0, 1)


def _scores(qg, k_b, q_pos, q_seg, kpos, kseg):
    """Scaled, masked logits [B, K, G, T, blk] (f32) of one key block, and the mask."""
    mask = attention_mask(q_pos, q_seg, kpos, kseg)[:, None, None, :, :]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k_b, preferred_element_type=jnp.float32)
    return jnp.where(mask, logits * (qg.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min), mask


def _scan_peeled(step, init, xs):
    """lax.scan(step, init, xs) with the first block run outside the loop: its carry then
    varies over the same manual mesh axes as the body's result inside shard_map (a constant
    init would not, and the loop would be rejected), without naming those axes here."""
    carry, y0 = step(init, jax.tree.map(lambda a: a[0], xs))
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return carry, jax.tree.map(lambda a: a[None], y0)
    carry, ys = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[1:], xs))
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)


def _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
    """(out [B, T, N, H] in q's dtype, (running max, sum of exp) [B, K, G, T] f32).

    The statistics stay two arrays rather than one log-sum-exp: in a fully masked row the max
    is float32's min, which absorbs log(S) and would turn the uniform 1/S into 1."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    blk = _key_blocks(k.shape[1], block)

    def step(carry, xs):
        m, l, acc = carry
        k_b, v_b, kpos, kseg = xs
        s, _ = _scores(qg, k_b, q_pos, q_seg, kpos, kseg)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v_b,
                        preferred_element_type=jnp.float32)
        return (m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv), ()

    stats = (b, kh, n // kh, t)
    init = (jnp.full(stats, jnp.finfo(jnp.float32).min), jnp.zeros(stats),
            jnp.zeros((*stats, h)))
    xs = tuple(_blocked(a, blk) for a in (k, v, k_pos, k_seg))
    (m, l, acc), _ = _scan_peeled(step, init, xs)
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.astype(q.dtype), (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
    return _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, block)[0]


def _flash_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
    out, stats = _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, block)
    return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, out, stats)


def _flash_bwd(block, res, d_out):
    """dS = P ∘ (dP − rowsum(dO ∘ O)) per key block (Dao et al. 2022, Algorithm 2); dq is
    carried, dk and dv leave as scan outputs. Masked scores get no gradient (as through the
    reference's `where`), while dv sees the uniform weights of fully masked rows, as there."""
    q, k, v, q_pos, q_seg, k_pos, k_seg, out, (m, l) = res
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    dog = d_out.reshape(b, t, kh, n // kh, h)
    delta = jnp.einsum("btkgh,btkgh->bkgt", dog, out.reshape(dog.shape),
                       preferred_element_type=jnp.float32)
    blk = _key_blocks(k.shape[1], block)
    scale = h ** -0.5

    def step(dq, xs):
        k_b, v_b, kpos, kseg = xs
        s, mask = _scores(qg, k_b, q_pos, q_seg, kpos, kseg)
        p = jnp.exp(s - m[..., None]) / l[..., None]
        dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(dog.dtype), dog,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgh,bskh->bkgts", dog, v_b, preferred_element_type=jnp.float32)
        ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds.astype(k_b.dtype), k_b,
                             preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,btkgh->bskh", ds.astype(qg.dtype), qg,
                        preferred_element_type=jnp.float32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    xs = tuple(_blocked(a, blk) for a in (k, v, k_pos, k_seg))
    dq, (dk, dv) = _scan_peeled(step, jnp.zeros(qg.shape), xs)
    unblock = lambda a: a.swapaxes(0, 1).reshape(b, -1, *a.shape[3:])  # noqa: E731
    return (dq.reshape(q.shape).astype(q.dtype), unblock(dk), unblock(dv),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None, *, block: int = 0):
    """Equals dot_product_attention(q, k, v, attention_mask(q_pos, q_seg, k_pos, k_seg)) in
    value and gradient, in O(T · block) memory. q [B, T, N, H]; k, v [B, S, K, H]; positions
    and segment ids [B, T] / [B, S] (keys default to the queries'); block 0 = BLOCK."""
    k_pos = q_pos if k_pos is None else k_pos
    k_seg = q_seg if k_seg is None else k_seg
    return _flash(q, k, v, q_pos, q_seg, k_pos, k_seg, block or BLOCK)


def reference_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None):
    """`dot_product_attention` with the mask built from positions and segment ids."""
    k_pos = q_pos if k_pos is None else k_pos
    k_seg = q_seg if k_seg is None else k_seg
    return dot_product_attention(q, k, v, attention_mask(q_pos, q_seg, k_pos, k_seg))


# Attention for training steps without a cache, chosen by mesh.attention (an execution option,
# not part of the model): "reference" (the einsums above, autodiff; whole [B, N, T, S] scores)
# and "chunked" (flash-style, O(T · block)). Backends add their own (backends/__init__.py).
IMPLS = {"reference": reference_attention, "chunked": chunked_attention}


# ----------------------------------------------------------------------------------------------
# Context parallelism (Llama 3 paper §3.3.2): the sequence is split over a mesh axis of C ranks.
# Rank i holds chunks i and 2C-1-i of 2C equal chunks, so that under the causal mask every rank
# does the same amount of useful work. The model masks from positions and segment ids, not from
# array indices, so the chunks only need to carry their own positions/segments: the reordering
# is a permutation of the batch's token axis (`load_balance_order`), invisible to the loss.


def load_balance_order(seq_len: int, context: int):
    """Token order [T] (numpy) that puts chunks (i, 2C-1-i) contiguously on context rank i."""
    if seq_len % (2 * context):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context = "
                         f"{2 * context}; choose a seq_len that is a multiple of it.")
    chunks = np.arange(seq_len).reshape(2 * context, seq_len // (2 * context))
    pairs = [np.concatenate([chunks[i], chunks[2 * context - 1 - i]]) for i in range(context)]
    return np.concatenate(pairs)


def _all_gather_attention(q, k, v, pos, seg, *, axis, local=reference_attention):
    """Llama 3's variant: all-gather K, V (and their positions/segments), attend locally with
    `local` (the local T/C queries against all T keys)."""
    gather = lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True)  # noqa: E731
    k, v, k_pos, k_seg = gather(k), gather(v), gather(pos), gather(seg)
    return local(q, k, v, pos, seg, k_pos, k_seg)


def _ring_attention(q, k, v, pos, seg, *, axis, local=reference_attention):
    """K/V blocks travel round the ring by ppermute; an online softmax (Milakov & Gimelshein
    2018, as in flash and ring attention) folds in one block per step. Fully masked query rows
    end uniform over all keys, as in `dot_product_attention`. (`local` is unused: the ring
    already attends one block at a time.)"""
    del local
    c = jax.lax.axis_size(axis)
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    neg = jnp.finfo(jnp.float32).min
    m = jnp.full((b, kh, n // kh, t), neg, jnp.float32)   # running max
    l = jnp.zeros((b, kh, n // kh, t), jnp.float32)       # running sum of exp
    acc = jnp.zeros((b, kh, n // kh, t, h), jnp.float32)  # running sum of exp * v
    kv = (k, v, pos, seg)
    for step in range(c):
        k_b, v_b, kpos, kseg = kv
        mask = attention_mask(pos, seg, kpos, kseg)[:, None, None, :, :]
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, k_b, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits * (h ** -0.5), neg)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskh->bkgth", p, v_b.astype(jnp.float32))
        m = m_new
        if step < c - 1:  # pass our block to the next rank, receive the previous rank's
            perm = [(i, (i + 1) % c) for i in range(c)]
            kv = jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), kv)
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


def context_mesh(mesh):
    """`mesh`, or None (use the current one) inside jax.set_mesh or another shard_map, where
    the current abstract mesh knows which axes are already manual."""
    return mesh if jax.sharding.get_abstract_mesh().empty else None


CONTEXT_IMPLS = {"all_gather": _all_gather_attention, "ring": _ring_attention}


def context_parallel_attention(q, k, v, positions, segment_ids, *, mesh, axis="context",
                               impl="all_gather", local=reference_attention):
    """Attention with the token axis of q [B, T, N, H], k, v [B, T, K, H] and positions /
    segment_ids [B, T] split over mesh axis `axis` (inside jax.shard_map; the other mesh axes
    stay automatic). Each rank's queries see every rank's keys through the positions/segments
    mask, so documents and causality are right across chunks in any token order. `local`
    (an attention function taking key positions and segments, e.g. a backend's) is what each
    rank runs on its queries and the gathered keys."""
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"Unknown context-parallel attention {impl!r}; valid: "
                         f"{', '.join(CONTEXT_IMPLS)}.")
    spec = jax.sharding.PartitionSpec(None, axis)
    fn = functools.partial(CONTEXT_IMPLS[impl], axis=axis, local=local)
    # check_vma off: Pallas kernels as `local` (backends/tpu.py, gpu.py) declare outputs without
    # varying-axis types, which the check rejects; every input and output here is split over
    # `axis`, so it has nothing to catch.
    return jax.shard_map(fn, mesh=context_mesh(mesh), in_specs=(spec,) * 5, out_specs=spec,
                         axis_names={axis}, check_vma=False)(q, k, v, positions, segment_ids)
