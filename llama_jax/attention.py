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


def _all_gather_attention(q, k, v, pos, seg, *, axis):
    """Llama 3's variant: all-gather K, V (and their positions/segments), attend locally."""
    gather = lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True)  # noqa: E731
    k, v, k_pos, k_seg = gather(k), gather(v), gather(pos), gather(seg)
    return dot_product_attention(q, k, v, attention_mask(pos, seg, k_pos, k_seg))


def _ring_attention(q, k, v, pos, seg, *, axis):
    """K/V blocks travel round the ring by ppermute; an online softmax (Milakov & Gimelshein
    2018, as in flash and ring attention) folds in one block per step. Fully masked query rows
    end uniform over all keys, as in `dot_product_attention`."""
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
                               impl="all_gather"):
    """Attention with the token axis of q [B, T, N, H], k, v [B, T, K, H] and positions /
    segment_ids [B, T] split over mesh axis `axis` (inside jax.shard_map; the other mesh axes
    stay automatic). Each rank's queries see every rank's keys through the positions/segments
    mask, so documents and causality are right across chunks in any token order."""
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"Unknown context-parallel attention {impl!r}; valid: "
                         f"{', '.join(CONTEXT_IMPLS)}.")
    spec = jax.sharding.PartitionSpec(None, axis)
    fn = functools.partial(CONTEXT_IMPLS[impl], axis=axis)
    return jax.shard_map(fn, mesh=context_mesh(mesh), in_specs=(spec,) * 5, out_specs=spec,
                         axis_names={axis})(q, k, v, positions, segment_ids)
