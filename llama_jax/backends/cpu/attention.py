"""Training attention in XLA:CPU's forms, and the CPU attention kernel (the cpu backend's
`full` attention, its default).

`materialized_attention` equals attention.reference_attention in value and gradient:
- bf16 self-attention through the C++ kernel (csrc/attention.cc) where `kernel_applies`;
- else causal query blocks when the mask allows (`_causal_blocks`), with a lax.cond to the
  whole computation when it does not;
- else whole [B, N, T, S] scores with a custom VJP in XLA:CPU's fast dot forms.
Measured step times are in BENCHMARKS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.attention import attention_mask
from llama_jax.backends.cpu import kernels
from llama_jax.backends.cpu.dense import transpose, varying_like

CAUSAL_BLOCK = 128  # smallest causal query block (0: never block)


# ----------------------------------------------------------------------------------------------
# Training attention with whole [B, N, T, S] scores ("full", the default), written for
# XLA:CPU's fast dot forms (backends/cpu/dense.py: a bf16 dot runs on the bf16 kernels only as
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


def materialized_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None, *,
                           causal_block: int = CAUSAL_BLOCK, kernel: bool = True):
    """Equals dot_product_attention(q, k, v, attention_mask(q_pos, q_seg, k_pos, k_seg)) in
    value (f32 logits and softmax) and gradient, with a backward pass in XLA:CPU's fast dot
    forms. q [B, T, N, H]; k, v [B, S, K, H]; positions and segment ids [B, T] / [B, S].

    bf16 self-attention (no k_pos / k_seg) runs the CPU kernel where `kernel_applies` (and
    `kernel`). Other self-attention over T >= 2 · causal_block tokens (0: never) skips the
    score blocks above the diagonal when the mask shows that no query sees a key of a later
    block (tokens in order, as in every packed training row): `_causal_blocks`."""
    if kernel and k_pos is None and k_seg is None and kernel_applies(q, k, v):
        return _kernel(q, k, v, q_pos, q_seg)
    block = query_block(q.shape[1], causal_block)
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

MAX_CAUSAL_BLOCKS = 8  # query blocks per row at most


def query_block(t: int, smallest: int = CAUSAL_BLOCK) -> int:
    """The query block for T tokens of self-attention (at least `smallest`, at most
    MAX_CAUSAL_BLOCKS per row), or 0 when blocking does not apply."""
    if smallest <= 0:
        return 0
    block = max(smallest, -(-t // MAX_CAUSAL_BLOCKS))
    return block if t % block == 0 and t // block >= 2 else 0


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
        zeros = (jnp.zeros((b, kv, g * block, end), v.dtype) for end in ends)
        # typed like the other branch's probabilities inside shard_map (a pipeline stage):
        # lax.cond needs both branches' outputs to vary over the same manual mesh axes
        return out, tuple(varying_like(z, q5, k_h, v_h, pos, seg) for z in zeros)

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
# The CPU kernel (llama_jax/kernels/attention.cc through llama_jax/kernels.py): bf16
# self-attention forward and backward with 64 queries x 256 keys in cache at a time (flash
# attention's online softmax; the backward recomputes the probabilities from the saved
# log-sum-exp), products on AMX / AVX-512 BF16, the exact mask element by element and key
# tiles no query of a block can see skipped. Bench shape, one layer, forward + backward:
# ~10 ms against ~30 ms for the causal blocks above.

def kernel_applies(q, k, v) -> bool:
    """Whether self-attention of q, k, v can run the CPU kernel: bf16, T and H multiples of 32, every automatically partitioned mesh axis of size 1 (the kernel is one
    custom call that XLA cannot split; inside shard_map it sees the local shard), and the
    kernel built for this CPU (kernels.attention_available)."""
    if any(a.dtype != jnp.bfloat16 for a in (q, k, v)):
        return False
    if q.shape[1] % kernels.ATTENTION_MULTIPLE or q.shape[3] % kernels.ATTENTION_MULTIPLE:
        return False
    return kernels.local_only() and kernels.attention_available()


@jax.custom_vjp
def _kernel(q, k, v, pos, seg):
    return kernels.attention_forward(q, k, v, pos, seg)[0]


def _kernel_fwd(q, k, v, pos, seg):
    out, lse = kernels.attention_forward(q, k, v, pos, seg)
    return out, (q, k, v, pos, seg, out, lse)


def _kernel_bwd(res, d_out):
    q, k, v, pos, seg, out, lse = res
    return (*kernels.attention_backward(q, k, v, pos, seg, out, d_out, lse), None, None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


# Attention for training steps without a cache, chosen by mesh.attention (an execution option,
# not part of the model): "full" (default) and "reference" (autodiff of the einsums, slower on
