"""The tpu backend: training attention through Pallas's splash attention kernel.

    backends.get("tpu")                       # `auto` on a TPU; mesh.attention=splash elsewhere

`splash_attention` equals attention.reference_attention (value and gradient) on the rows the
model trains on, without materialising [B, N, T, S] scores: the kernel (jax.experimental.
pallas.ops.tpu.splash_attention) tiles queries and keys, skips blocks the mask empties, and
has its own backward kernels (dq, and dk/dv).

How the model's mask maps onto the kernel's:
- documents: splash's SegmentIds (a query sees a key only with the same id);
- causality: splash's causal mask compares token *indices*, the model compares *positions*.
  Within one document positions grow with the index (data.py packs them so; so do right-padded
  prompts), so the two agree on every pair the segment ids leave visible.
- padding (segment 0): the reference hides segment-0 keys from everyone and gives segment-0
  queries a uniform row; here segment-0 queries attend to earlier segment-0 keys. No other
  query sees them, and their outputs are never read by the loss, so loss and gradients agree.
- GQA: the MQA form of the kernel (one K/V head shared by a group of G query heads) vmapped
  over the K kv heads, so K/V are never repeated in memory.
- context parallelism (attention._all_gather_attention): the local queries are this rank's
  chunks i and 2C-1-i and the keys arrive in that load-balanced order. The keys are put back in
  token order (a static gather) and the kernel is built once for all C*T queries with the
  token index of each query row as its `q_sequence` (the mask is then `q_sequence >= key
  index`, i.e. the true causal offsets); rank i takes its 1/C of the kernel's mask tables,
  exactly what the kernel's own manual_sharding_spec hands each shard of q_seq_shards=C.

Block sizes (one rule for forward and both backward kernels): 512 where it divides the length,
else 256, else 128 (512 x 512 tiles fill the MXU and amortise the per-step overhead; smaller
ones only when the length asks for it). Lengths that are not a multiple of 128 are padded with
segment-0 tokens (invisible to real queries) and the padding sliced off; under context
parallelism each rank's chunk must be a multiple of 128 (one sentence says so otherwise).
On a CPU (the tests) the same kernel code runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from llama_jax import attention
from llama_jax.backends import Backend

LANES = 128           # sequence tiles are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)


def block_size(n: int) -> int:
    """The rule above: the largest of BLOCKS dividing n (n a multiple of LANES)."""
    return next(b for b in BLOCKS if n % b == 0)


class _TokenOrderCausal(sa.CausalMask):
    """Causal mask whose query rows are the tokens `order` (row r is token order[r]) and whose
    keys are in token order: row r sees key s iff s <= order[r]."""

    def __init__(self, order: np.ndarray, kv_len: int):
        super().__init__((len(order), kv_len))
        self.q_sequence = np.asarray(order, np.int32)


def _kernel(t: int, s: int, groups: int, context: int, interpret: bool):
    """The MQA splash kernel for `context` ranks of t queries each (all t*context query rows,
    in the load-balanced order when context > 1) over s keys in token order, G heads.
    Built at trace time (its mask tables become constants of the traced program; the block
    analysis of the mask is cached by the kernel's own process_mask)."""
    order = attention.load_balance_order(t * context, context) if context > 1 else np.arange(t)
    mask = sa.MultiHeadMask([_TokenOrderCausal(order, s)] * groups)
    bq, bkv = block_size(t), block_size(s)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mqa(mask, block_sizes=blocks, head_shards=1, q_seq_shards=context,
                              interpret=interpret)


def _rank_slice(kernel, rank, context: int):
    """The kernel restricted to query shard `rank` of `context` (traced): its mask tables cut
    along the query-block axis and its q_sequence along the queries, as manual_sharding_spec
    would shard them over a mesh axis."""
    def cut(a, axis):
        if a is None:
            return None
        n = a.shape[axis] // context
        return jax.lax.dynamic_slice_in_dim(a, rank * n, n, axis)

    def info(mi):
        if mi is None:
            return None
        return mi._replace(data_next=cut(mi.data_next, 1), mask_next=cut(mi.mask_next, 1),
                           block_mask=cut(mi.block_mask, 1), q_sequence=cut(mi.q_sequence, 0))
    return type(kernel)(info(kernel.fwd_mask_info), info(kernel.dq_mask_info),
                        info(kernel.dkv_mask_info), **kernel.kwargs)


def _pad(a, n: int):
    """a [B, T, ...] zero-padded along T to n."""
    return jnp.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def splash_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None, *,
                     interpret: bool = False, context_axis: str = "context"):
    """attention.reference_attention's signature and result (module docstring) through the
    splash kernel. q [B, T, N, H]; k, v [B, S, K, H]; S = T, or S = C*T inside context
    parallelism over `context_axis` (keys gathered in attention.load_balance_order)."""
    del q_pos, k_pos  # causality by index within a document (module docstring)
    k_seg = q_seg if k_seg is None else k_seg
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    context = s // t
    if context > 1:
        if t % LANES:
            raise ValueError(f"splash attention under context parallelism needs each rank's "
                             f"{t}-token chunk to be a multiple of {LANES}; choose data.seq_len "
                             f"a multiple of {LANES} x mesh.context = {LANES * context}.")
        inverse = np.argsort(attention.load_balance_order(s, context))
        k, v, k_seg = (jnp.take(a, inverse, axis=1) for a in (k, v, k_seg))
        kernel = _rank_slice(_kernel(t, s, n // kh, context, interpret),
                             jax.lax.axis_index(context_axis), context)
        tp = t
    else:
        tp = -(-t // LANES) * LANES
        q, k, v, q_seg, k_seg = (_pad(a, tp) for a in (q, k, v, q_seg, k_seg))
        kernel = _kernel(tp, tp, n // kh, 1, interpret)
    # [B, K, G, T, H] queries, pre-scaled (the kernel applies no scale), and [B, K, S, H] keys
    qg = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(b, tp, kh, n // kh, h)
    qg = qg.transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(qr, kr, vr, qs, ks):
        seg = sa.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kk, vv: kernel(qh, kk, vv, segment_ids=seg))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kt, vt, q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)
    return out[:, :t].astype(q.dtype)


# T x S x H matmuls per head that each splash kernel runs: forward scores and context; the dq
# kernel's scores, dP and dq; the dk/dv kernel's scores, dP, dv and dk.
PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4}


def kernel_flops(name: str, shapes, seq_len: int, groups: int, context: int = 1) -> float | None:
    """FLOPs of one run of the splash kernel that the compiled HLO calls `name` (a TPU custom
    call, opaque to hlo_cost), from its output `shapes`; None when `name` is no splash kernel.

    Each of its PRODUCTS costs 2·H FLOPs per (query, key) pair the kernel visits. Our masks
    are causal, so it visits the blocks on and below the diagonal: T(T + b)/2 pairs per row
    and head for T = seq_len (padded to LANES) in blocks of b, the causal half plus half a
    block per query; under context parallelism a rank's t = T/C queries visit t(T + b)/2 (the
    load-balanced chunks share the diagonal evenly). The largest output says how many rows and
    heads the call covers: [..., t, H] queries (fwd, dq) or [..., T, H] keys of a kv head
    (dkv; its G = `groups` query heads each visit t(T + b)/2 pairs)."""
    kind = re.search(r"splash_mqa_(fwd|dq|dkv)", name)
    if not kind or not shapes:
        return None
    s = -(-seq_len // LANES) * LANES
    big = max(shapes, key=lambda d: (len(d), math.prod(d)))
    rows, queries, h = math.prod(big[:-2]), big[-2], big[-1]
    if kind.group(1) == "dkv":
        rows, queries = rows * groups, s // context
    return PRODUCTS[kind.group(1)] * 2.0 * h * rows * queries * (s + block_size(s)) / 2


@functools.cache
def make(interpret: bool = False) -> Backend:
    """The tpu backend: the plain math with splash attention (interpreted on a CPU)."""
    fn = functools.partial(splash_attention, interpret=interpret)
    return Backend(name="tpu", attentions=(("splash", fn),), default_attention="splash")
