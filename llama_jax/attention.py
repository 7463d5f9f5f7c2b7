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

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import cpu_kernels
from llama_jax.dense import transpose


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


# ----------------------------------------------------------------------------------------------
# Training attention with whole [B, N, T, S] scores ("full", the default), written for
# XLA:CPU's fast dot forms (llama_jax/dense.py: a bf16 dot runs on the bf16 kernels only as
# bf16 x bf16 -> f32 with a row-major left operand contracting its minor dimension; any other
# is upcast to f32). Autodiff of the einsums in `dot_product_attention` writes dV = Pᵀ·dO and
# dK = dSᵀ·Q, whose left operands contract the query axis of [T, S]-sized arrays: upcast f32
# products plus full transposes of the scores (~60% of the bench shape's bf16 train step).
# This backward computes dVᵀ = dOᵀ·P and dKᵀ = Qᵀ·dS, so only [T, H]-sized arrays are ever
# transposed; the probabilities are kept in the compute dtype for it. Bench shape, one layer,
# forward + backward: 138 -> 26 ms in bf16, 154 -> 53 ms in f32 (the einsum reference).


def _layouts(q, k, v):
    """q [B, T, N, H] -> [B, K, G, T, H]; k, v [B, S, K, H] -> [B, K, S, H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q5 = transpose(q.reshape(b, t, kv, n // kv, h), (0, 2, 3, 1, 4))
    return q5, transpose(k, (0, 2, 1, 3)), transpose(v, (0, 2, 1, 3))


def _query_block(a5, i: int, block: int):
    """Rows i·block .. (i + 1)·block of a [B, K, G, T, X] array as [B, K, G·block, X]: each
    kv head's G query heads as one row block."""
    b, kv, g, _, x = a5.shape
    return a5[:, :, :, i * block:(i + 1) * block].reshape(b, kv, g * block, x)


def _bdot(a, b, a_contract: int, b_contract: int):
    """Batched (B, K) dot of a and b over one dim each, accumulated and returned in f32."""
    return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)


def _probs(q, k, q_pos, q_seg, k_pos, k_seg):
    """Softmax probabilities [B, K, G·T, S] (f32)."""
    b, kh, gt, h = q.shape
    t, s = q_pos.shape[1], k.shape[2]
    logits = _bdot(q, k, 3, 3).reshape(b, kh, gt // t, t, s)
    mask = attention_mask(q_pos, q_seg, k_pos, k_seg)[:, None, None]
    logits = jnp.where(mask, logits * (h ** -0.5), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).reshape(b, kh, gt, s)


def _blocked_forward(q5, k_h, v_h, q_pos, q_seg, k_pos, k_seg, block: int, ends, dtype):
    """Query block i (rows i·block ..) against keys 0 .. ends[i]: (out [B, T, N, H], each
    block's probabilities [B, K, G·block, ends[i]] in v's dtype)."""
    b, kv, g, t, h = q5.shape
    outs, probs = [], []
    for i, end in enumerate(ends):
        rows = slice(i * block, (i + 1) * block)
        p = _probs(_query_block(q5, i, block), k_h[:, :, :end], q_pos[:, rows], q_seg[:, rows],
                   k_pos[:, :end], k_seg[:, :end]).astype(v_h.dtype)
        outs.append(_bdot(p, v_h[:, :, :end], 3, 2).astype(dtype).reshape(b, kv, g, block, h))
        probs.append(p)
    out = transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4)).reshape(b, t, kv * g, h)
    return out, tuple(probs)


def _blocked_backward(q5, k_h, v_h, probs, out, q_pos, q_seg, k_pos, k_seg, block: int,
                      d_out):
    """dS = P ∘ (dP − rowsum(dO ∘ O)) as in `_flash_bwd`, one query block at a time (masked
    scores get no gradient); key gradients summed over the blocks. dVᵀ = dOᵀ·P and
    dKᵀ = Qᵀ·dS: the score-sized operand on the right."""
    b, kv, g, t, h = q5.shape
    s_all = k_h.shape[2]
    do5 = transpose(d_out.astype(q5.dtype).reshape(b, t, kv, g, h), (0, 2, 3, 1, 4))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    delta5 = transpose(delta.reshape(b, t, kv, g, 1), (0, 2, 3, 1, 4))          # [B, K, G, T, 1]
    dq, dk_t, dv_t = [], 0.0, 0.0
    for i, p in enumerate(probs):
        rows, end = slice(i * block, (i + 1) * block), p.shape[-1]
        q_i, do_i = _query_block(q5, i, block), _query_block(do5, i, block)
        dp = _bdot(do_i, v_h[:, :, :end], 3, 3)                                # [B, K, G·bl, end]
        mask = attention_mask(q_pos[:, rows], q_seg[:, rows], k_pos[:, :end], k_seg[:, :end])
        ds = (p.astype(jnp.float32) * (dp - _query_block(delta5, i, block)))
        ds = jnp.where(mask[:, None, None], ds.reshape(b, kv, g, block, end), 0.0) * (h ** -0.5)
        ds = ds.reshape(b, kv, g * block, end).astype(q5.dtype)
        dq.append(_bdot(ds, k_h[:, :, :end], 3, 2).astype(q5.dtype).reshape(b, kv, g, block, h))
        pad = ((0, 0), (0, 0), (0, 0), (0, s_all - end))  # [B, K, H, end] -> [B, K, H, S]
        dk_t = dk_t + jnp.pad(_bdot(transpose(q_i, (0, 1, 3, 2)), ds, 3, 2), pad)
        dv_t = dv_t + jnp.pad(_bdot(transpose(do_i, (0, 1, 3, 2)), p, 3, 2), pad)
    dq = transpose(jnp.concatenate(dq, axis=3), (0, 3, 1, 2, 4)).reshape(b, t, kv * g, h)
    dk = transpose(dk_t.astype(k_h.dtype), (0, 3, 1, 2))
    dv = transpose(dv_t.astype(v_h.dtype), (0, 3, 1, 2))
    return dq, dk, dv


def _materialized_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg):
    q5, k_h, v_h = _layouts(q, k, v)
    out, probs = _blocked_forward(q5, k_h, v_h, q_pos, q_seg, k_pos, k_seg, q.shape[1],
                                  (k.shape[1],), q.dtype)  # one block: all queries, all keys
    return out, (q5, k_h, v_h, probs, out, q_pos, q_seg, k_pos, k_seg)


@jax.custom_vjp
def _materialized(q, k, v, q_pos, q_seg, k_pos, k_seg):
    return _materialized_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg)[0]


def _materialized_bwd(res, d_out):
    q5, k_h, v_h, probs, out, q_pos, q_seg, k_pos, k_seg = res
    dq, dk, dv = _blocked_backward(q5, k_h, v_h, probs, out, q_pos, q_seg, k_pos, k_seg,
                                   q5.shape[3], d_out)
    return dq, dk, dv, None, None, None, None


_materialized.defvjp(_materialized_fwd, _materialized_bwd)


def materialized_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None):
    """Equals dot_product_attention(q, k, v, attention_mask(q_pos, q_seg, k_pos, k_seg)) in
    value (f32 logits and softmax) and gradient, with a backward pass in XLA:CPU's fast dot
    forms. q [B, T, N, H]; k, v [B, S, K, H]; positions and segment ids [B, T] / [B, S].

    bf16 self-attention (no k_pos / k_seg) runs the CPU kernel where `kernel_applies`. Other
    self-attention over T >= 2 · CAUSAL_BLOCK tokens skips the score blocks above the diagonal
    when the mask shows that no query sees a key of a later block (tokens in order, as in
    every packed training row): `_causal_blocks`."""
    if k_pos is None and k_seg is None and kernel_applies(q, k, v):
        return _kernel(q, k, v, q_pos, q_seg)
    t = q.shape[1]
    block = causal_block(t)
    if k_pos is None and k_seg is None and block:
        return _causal_blocks(q, k, v, q_pos, q_seg, block)
    k_pos = q_pos if k_pos is None else k_pos
    k_seg = q_seg if k_seg is None else k_seg
    return _materialized(q, k, v, q_pos, q_seg, k_pos, k_seg)


# ----------------------------------------------------------------------------------------------
# Causal blocks. Under the causal mask half of the [T, T] scores are masked, and on CPU the
# materialised attention is bound by the passes over score-sized arrays (logits, softmax,
# dP, dS), not by its dots: removing attention from the bench shape's bf16 train step takes
# 0.89 s to 0.62 s while its dots are ~50 of the step's ~350 GFLOP. Cutting the queries into
# n blocks, query block i against keys 0 .. (i + 1)·T/n only, does (n + 1) / 2n of the work.
# That is exact only when no query sees a key of a later block; `_in_order` checks it on the
# mask each call and a lax.cond falls back to the whole [T, T] computation otherwise (tokens
# out of order: a permuted row, positions that do not grow with the index).

_CAUSAL_BLOCK = 128
CAUSAL_BLOCK = _CAUSAL_BLOCK  # smallest query block (0: never block)
MAX_CAUSAL_BLOCKS = 8  # query blocks per row at most


def causal_block(t: int) -> int:
    """The query block for T tokens of self-attention, or 0 when blocking does not apply: on
    CPU only (measured there; on a GPU a lax.cond reads its predicate on the host, and fused
    attention kernels make the score passes cheap)."""
    if CAUSAL_BLOCK <= 0 or jax.default_backend() != "cpu":
        return 0
    block = max(CAUSAL_BLOCK, -(-t // MAX_CAUSAL_BLOCKS))
    return block if t % block == 0 and t // block >= 2 else 0


@contextlib.contextmanager
def causal_blocks(enabled: bool):
    """Turns the causal query blocks on or off for the calls traced inside (CAUSAL_BLOCK)."""
    global CAUSAL_BLOCK
    saved, CAUSAL_BLOCK = CAUSAL_BLOCK, (CAUSAL_BLOCK or _CAUSAL_BLOCK) if enabled else 0
    try:
        yield
    finally:
        CAUSAL_BLOCK = saved


def _in_order(mask, block: int):
    """Whether mask [B, T, T] hides every key of a later block than its query's."""
    blocks = jnp.arange(mask.shape[1]) // block
    return ~jnp.any(mask & (blocks[None, :] > blocks[:, None])[None])


def _causal_blocks(q, k, v, pos, seg, block: int):
    return _padding_rows_mean(_causal(q, k, v, pos, seg, block), v, seg)


def _padding_rows_mean(out, v, seg):
    """A query that sees no key (padding: segment 0; in self-attention any other query sees
    itself) gets the mean of all values, as the whole computation's uniform softmax gives it,
    instead of what a computation that skips keys left there."""
    b, t, n, h = out.shape
    kv = v.shape[2]
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1).astype(out.dtype)  # [B, K, H]
    mean_v = jnp.broadcast_to(mean_v[:, None, :, None], (b, t, kv, n // kv, h))
    return jnp.where((seg == 0)[:, :, None, None], mean_v.reshape(b, t, n, h), out)


# The lax.cond sits inside one custom VJP, in the forward and again in the backward, so that
# autodiff does not linearise it: a linearised cond returns the residuals of both branches,
# zero-filling the unused one's (the whole [T, T] probabilities) on every call (~3 ms of a
# 17 ms bf16 layer at the bench shape). The fallback keeps no probabilities and recomputes
# them in its backward.

def _causal_fwd(q, k, v, pos, seg, block):
    q5, k_h, v_h = _layouts(q, k, v)
    ends = tuple(range(block, q.shape[1] + 1, block))  # query block i: keys 0 .. (i + 1)·block

    def whole():  # tokens out of order: the [T, T] scores, nothing kept for the backward
        out = _materialized(q, k, v, pos, seg, pos, seg)
        b, kv, g = q5.shape[:3]
        return out, tuple(jnp.zeros((b, kv, g * block, end), v.dtype) for end in ends)

    ordered = _in_order(attention_mask(pos, seg, pos, seg), block)
    out, probs = jax.lax.cond(
        ordered,
        lambda: _blocked_forward(q5, k_h, v_h, pos, seg, pos, seg, block, ends, q.dtype), whole)
    return out, (q, k, v, q5, k_h, v_h, probs, out, pos, seg, ordered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal(q, k, v, pos, seg, block):
    """Self-attention with the causal query blocks when `_in_order`, else the whole [T, T]
    computation; the padding queries' outputs are fixed by the caller (`_causal_blocks`)."""
    return _causal_fwd(q, k, v, pos, seg, block)[0]


def _causal_bwd(block, res, d_out):
    q, k, v, q5, k_h, v_h, probs, out, pos, seg, ordered = res

    def whole():
        _, vjp = jax.vjp(lambda q, k, v: _materialized(q, k, v, pos, seg, pos, seg), q, k, v)
        return vjp(d_out)

    dq, dk, dv = jax.lax.cond(
        ordered,
        lambda: _blocked_backward(q5, k_h, v_h, probs, out, pos, seg, pos, seg, block, d_out),
        whole)
    return dq, dk, dv, None, None


_causal.defvjp(_causal_fwd, _causal_bwd)


# ----------------------------------------------------------------------------------------------
# The CPU kernel (llama_jax/kernels/attention.cc through llama_jax/cpu_kernels.py): bf16
# self-attention forward and backward with 64 queries x 256 keys in cache at a time (flash
# attention's online softmax; the backward recomputes the probabilities from the saved
# log-sum-exp), products on AMX / AVX-512 BF16, the exact mask element by element and key
# tiles no query of a block can see skipped. Bench shape, one layer, forward + backward:
# ~10 ms against ~30 ms for the causal blocks above.

CPU_KERNEL = True  # off: cpu_kernel(False)


@contextlib.contextmanager
def cpu_kernel(enabled: bool):
    """Turns the CPU attention kernel on or off for the calls traced inside."""
    global CPU_KERNEL
    saved, CPU_KERNEL = CPU_KERNEL, enabled
    try:
        yield
    finally:
        CPU_KERNEL = saved


def kernel_applies(q, k, v) -> bool:
    """Whether self-attention of q, k, v runs the CPU kernel: CPU_KERNEL on, bf16, T and H
    multiples of 32, every automatically partitioned mesh axis of size 1 (the kernel is one
    custom call that XLA cannot split; inside shard_map it sees the local shard), and the
    kernel built for this CPU (cpu_kernels.attention_available)."""
    if not CPU_KERNEL or any(a.dtype != jnp.bfloat16 for a in (q, k, v)):
        return False
    if q.shape[1] % cpu_kernels.ATTENTION_MULTIPLE or q.shape[3] % cpu_kernels.ATTENTION_MULTIPLE:
        return False
    return cpu_kernels.local_only() and cpu_kernels.attention_available()


@jax.custom_vjp
def _kernel(q, k, v, pos, seg):
    return cpu_kernels.attention_forward(q, k, v, pos, seg)[0]


def _kernel_fwd(q, k, v, pos, seg):
    out, lse = cpu_kernels.attention_forward(q, k, v, pos, seg)
    return out, (q, k, v, pos, seg, out, lse)


def _kernel_bwd(res, d_out):
    q, k, v, pos, seg, out, lse = res
    return (*cpu_kernels.attention_backward(q, k, v, pos, seg, out, d_out, lse), None, None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


# Attention for training steps without a cache, chosen by mesh.attention (an execution option,
# not part of the model): "full" (default) and "reference" (autodiff of the einsums, slower on
# CPU, kept for checking) hold whole [B, N, T, S] scores; "chunked" holds O(T · block).
IMPLS = {"full": materialized_attention, "chunked": chunked_attention,
         "reference": reference_attention}
DEFAULT = "full"

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


def _all_gather_attention(q, k, v, pos, seg, *, axis, local=DEFAULT):
    """Llama 3's variant: all-gather K, V (and their positions/segments), attend locally with
    IMPLS[local] (the local T/C queries against all T keys)."""
    gather = lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True)  # noqa: E731
    k, v, k_pos, k_seg = gather(k), gather(v), gather(pos), gather(seg)
    return IMPLS[local](q, k, v, pos, seg, k_pos, k_seg)


def _ring_attention(q, k, v, pos, seg, *, axis, local=DEFAULT):
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
                               impl="all_gather", local=DEFAULT):
    """Attention with the token axis of q [B, T, N, H], k, v [B, T, K, H] and positions /
    segment_ids [B, T] split over mesh axis `axis` (inside jax.shard_map; the other mesh axes
    stay automatic). Each rank's queries see every rank's keys through the positions/segments
    mask, so documents and causality are right across chunks in any token order. `local`
    (a key of IMPLS) is the attention each rank runs on its queries and the gathered keys."""
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"Unknown context-parallel attention {impl!r}; valid: "
                         f"{', '.join(CONTEXT_IMPLS)}.")
    spec = jax.sharding.PartitionSpec(None, axis)
    fn = functools.partial(CONTEXT_IMPLS[impl], axis=axis, local=local)
    return jax.shard_map(fn, mesh=context_mesh(mesh), in_specs=(spec,) * 5, out_specs=spec,
                         axis_names={axis})(q, k, v, positions, segment_ids)
