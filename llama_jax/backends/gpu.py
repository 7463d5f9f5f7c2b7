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
"""

from __future__ import annotations

import functools

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


def flash_attention(q, k, v, q_pos, q_seg, k_pos=None, k_seg=None, *, interpret: bool = False):
    """attention.reference_attention's signature and result (module docstring) through the
    Pallas GPU kernel. q [B, T, N, H]; k, v [B, S, K, H]."""
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
    out = pallas_attention.mha(pad(q), pad(k), pad(v), pad(q_seg).astype(jnp.int32),
                               sm_scale=h ** -0.5, causal=True, block_sizes=BLOCKS,
                               interpret=interpret)
    return out[:, :t]


@functools.cache
def make(interpret: bool = False) -> Backend:
    """The gpu backend: the plain math with the Pallas GPU flash kernel (interpreted on a CPU)."""
    fn = functools.partial(flash_attention, interpret=interpret)
    return Backend(name="gpu", attentions=(("pallas_gpu", fn),),
                   default_attention="pallas_gpu")
