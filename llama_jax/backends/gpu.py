"""The gpu backend: training attention through Pallas's GPU flash attention kernel.

    backends.get("gpu")                  # `auto` on a GPU; mesh.attention=pallas_gpu elsewhere

Why this kernel and not cuDNN: jax.nn.dot_product_attention(implementation="cudnn") expresses
a causal mask and per-row lengths, not packed documents; packed rows would need an explicit
[B, T, S] mask, the very array fused attention exists to avoid. The Pallas GPU kernel
(jax.experimental.pallas.ops.gpu.attention.mha; Triton on the GPU) takes segment ids, has its
own backward kernels, and runs on a CPU in Pallas interpret mode, so its numerics are tested
here on every run (tests/test_accel_attention.py), not only where a GPU is lent.

The mask mapping is backends/tpu.py's (segment ids for documents, index-causal within a
document, segment-0 padding queries attending to earlier padding, never read by the loss).
Two limits of this kernel, both handled here:
- it has one head count for q, k and v, so GQA repeats K/V in memory ([B, S, N, H] instead
  of [B, S, K, H]; the gradient sums the copies back). That is G x the K/V bytes, still far
  below the [B, N, T, S] scores the plain attention materialises;
- its causal mask compares indices of one segment-id array, so under context parallelism
  (keys gathered from all ranks, S != T) the rank's attention is attention.chunked_attention,
  the plain-JAX flash form that masks from positions.
Lengths are padded to a multiple of 128 with segment-0 tokens and sliced back (as on TPU).

Planning a GPU target (tools/plan.py compiles it for simulated CPU devices) the kernel is
`planned_mha`, an opaque stand-in: one call forward and one backward with exactly the kernel's
inputs, outputs and saved residuals (out, lse), whose FLOPs `kernel_flops` gives. Interpreted
there, the kernel would be XLA:CPU loops whose every grid step moves whole buffers, an HBM
count that is the interpreter's, not a GPU's.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from llama_jax import attention
from llama_jax.backends import Backend

LANES = 128
# Forward tiles of 128 queries x 128 keys; backward tiles of 64 (the kernel keeps a dq/dk/dv
# tile each in registers; its own defaults are 32, tuned for smaller heads).
BLOCKS = pallas_attention.BlockSizes(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=64,
                                     block_q_dq=64, block_kv_dq=64)


def flash_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None, *, interpret: bool = False,
                    planned: bool = False):
    """attention.reference_attention's signature and result (module docstring) through the
    Pallas GPU kernel. q [B, T, N, H]; k, v [B, S, K, H]. planned: the planner's stand-in
    (`planned_mha`) in place of the kernel."""
    if k.shape[1] != q.shape[1]:  # context parallelism: keys of every rank (module docstring)
        return attention.chunked_attention(q, k, v, q_pos, q_seg, k_pos, k_seg)
    b, t, n, h = q.shape
    if h & (h - 1):  # the kernel tiles the head dim to the next power of two
        raise ValueError(f"mesh.attention=pallas_gpu needs a power-of-two head dim (64, 128, "
                         f"...) but this model's is {h}; use mesh.attention=chunked.")
    tp = -(-t // LANES) * LANES
    pad = lambda a: jnp.pad(a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    groups = n // k.shape[2]
    k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
    args = (pad(q), pad(k), pad(v), pad(q_seg).astype(jnp.int32))
    out = planned_mha(*args) if planned else pallas_attention.mha(
        *args, sm_scale=h ** -0.5, causal=True, block_sizes=BLOCKS, interpret=interpret)
    return out[:, :t]


# ----------------------------------------------------------------------------------------------
# The planner's stand-in: the kernel as XLA sees a compiled GPU kernel, one opaque call.


def _opaque(name: str, shapes, *args):
    """One call XLA cannot see into (on CPU a custom call of a Python callback, named by the
    `name` scope in its op_name), taking `args` and returning arrays of `shapes`. It is
    compiled ahead of time, never run."""
    def never(*_):
        raise RuntimeError(f"{name} is the planner's stand-in for the Pallas GPU kernel; it "
                           f"is compiled to be costed, never run.")
    with jax.named_scope(name):
        return jax.pure_callback(never, shapes, *args)


@jax.custom_vjp
def planned_mha(q, k, v, seg):
    """pallas_attention.mha(q, k, v, seg, causal=True) as one opaque call each way: q, k, v
    [B, T, N, H] (T a multiple of LANES), seg [B, T] int32 -> [B, T, N, H].

    HBM bytes (hlo_cost): each call's inputs and outputs once, and the backward's preprocess
    pass (out, dout -> delta). Not counted: tiles read again. The forward's query block i
    reads K/V blocks 0..i, (T + b)/2b times K and V per row and head if none stayed on chip;
    its grid's first axis (CUDA's x, launched fastest) is the query block, so the programs in
    flight share one or a few rows' and heads' K/V (4 MB at T = 8,192, H = 128, bf16) in the
    L2 (50 MB on an H100) and HBM sees them about once. The backward's grid launches one kv
    block of every row and head before the next block, so the Q/dO tiles its programs re-read
    may come from HBM: there this count is a lower bound."""
    return _planned_forward(q, k, v, seg)[0]


def _planned_forward(q, k, v, seg):
    b, t, n, _ = q.shape
    # the kernel's outputs: out, and the log-sum-exp of each query row [B, N, T] in f32
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    out, lse = _opaque("pallas_gpu_fwd", shapes, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)  # what the kernel's own VJP saves


def _planned_backward(res, do):
    q, k, v, seg, out, lse = res
    # the kernel's preprocess pass (an elementwise product and sum, no matmul): delta [B, N, T]
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    dq, dk, dv = _opaque("pallas_gpu_bwd", shapes, q, k, v, seg, do, lse, delta)
    return dq, dk, dv, None


planned_mha.defvjp(_planned_forward, _planned_backward)


def _pairs(t: int, b: int) -> int:
    """(query, key) pairs one causal pass of the kernel visits for one row and head over T = t
    (a multiple of b) in whole b x b tiles (BLOCKS' tiles are square): query block i reads key
    blocks 0 .. i, the causal half plus half a block per query, T(T + b)/2."""
    return t * (t + b) // 2


def kernel_flops(name: str, shapes) -> float | None:
    """FLOPs of one call of `planned_mha`'s forward or backward that the compiled HLO calls
    `name` (hlo_cost: a callback's op_name), from its output `shapes` ([B, T, N, H] first);
    None for any other call. Per row and head, each T x S x H product costs 2·H FLOPs per
    visited (query, key) pair (`_pairs` at BLOCKS' tile sizes):
        forward:  2 products (scores, context)         x 2H x pairs(128 x 128 tiles)
        backward: 4 in the dk/dv pass (scores, dv, dP, dk) x 2H x pairs(64 x 64)
                + 3 in the dq pass (scores, dP, dq)          x 2H x pairs(64 x 64)
    A run with remat=full calls the forward twice per layer (the HLO's trip counts say so)."""
    kind = re.search(r"pallas_gpu_(fwd|bwd)", name)
    if not kind or not shapes or len(shapes[0]) != 4:
        return None
    b, t, n, h = shapes[0]
    per_pair = 2.0 * h * b * n
    if kind.group(1) == "fwd":
        return 2 * per_pair * _pairs(t, BLOCKS.block_q)
    return per_pair * (4 * _pairs(t, BLOCKS.block_q_dkv) + 3 * _pairs(t, BLOCKS.block_q_dq))


@functools.cache
def make(interpret: bool = False, planned: bool = False) -> Backend:
    """The gpu backend: the plain math with the Pallas GPU flash kernel (interpreted on a CPU;
    planned: the planner's opaque stand-in, compiled but never run)."""
    fn = functools.partial(flash_attention, interpret=interpret, planned=planned)
    return Backend(name="gpu", attentions=(("pallas_gpu", fn),),
                   default_attention="pallas_gpu")
