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

import jax
import jax.numpy as jnp


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
