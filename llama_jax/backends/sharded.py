"""A Pallas attention kernel on a mesh: one shard_map over every mesh axis.

XLA's partitioner cannot split a kernel's custom call: under automatic sharding it would
gather every row and head onto each device and run the whole attention there. So the mesh
step (sharding.execution) runs a kernel attention inside a shard_map whose body sees only its
own rows (split over `data`), heads (over `tensor`) and, with context parallelism, its
chunks (over `context`, with attention.CONTEXT_IMPLS inside). This is the splash kernel's
intended use (its manual_sharding_spec) and MaxText's.

Heads: q's N heads split over tensor into contiguous groups. K/V's K heads split the same way
when tensor divides K (each rank's query heads then use exactly its kv heads); when K < tensor
(tensor a multiple of K), K/V stay whole and each rank takes the one kv head its query heads
share. The cotangents of that replicated K/V are summed over `tensor` by shard_map's
transpose, which is the sum over the ranks that used the head.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from llama_jax import attention


def kv_heads_follow(n_kv_heads: int, tensor: int) -> bool:
    """Whether each tensor rank's query heads use whole kv heads: `tensor` divides the kv heads
    (each rank holds its own) or is a multiple of them (each rank takes the one it shares)."""
    return n_kv_heads % tensor == 0 or tensor % n_kv_heads == 0


def check(n_heads: int, n_kv_heads: int, tensor: int) -> None:
    """One sentence when the kv heads cannot follow the query heads over `tensor`."""
    if not kv_heads_follow(n_kv_heads, tensor):
        raise ValueError(f"a Pallas attention kernel needs mesh.tensor = {tensor} to divide "
                         f"the {n_kv_heads} kv heads or be a multiple of them; choose such a "
                         f"tensor size or mesh.attention=chunked.")


def device_attention(q, k, v, pos, seg, *, local, context_impl, tensor, kv_split):
    """`local` on one device's rows, heads and chunks (inside a shard_map manual over every
    axis: here, and in pipeline_manual.py's stages). kv_split: K/V hold this rank's kv heads;
    else all K, and the rank takes the one its query heads share."""
    if not kv_split and tensor > 1:  # this rank's query heads share kv head r // (tp / K)
        per = tensor // k.shape[2]
        head = jax.lax.axis_index("tensor") // per
        k, v = (jax.lax.dynamic_slice_in_dim(a, head, 1, axis=2) for a in (k, v))
    if context_impl:
        return attention.CONTEXT_IMPLS[context_impl](q, k, v, pos, seg, axis="context",
                                                     local=local)
    return local(q, k, v, pos, seg)


def sharded_attention(q, k, v, positions, segment_ids, *, mesh, local, context_impl=None):
    """`local` (a kernel attention) on each device's rows, heads and chunks of q [B, T, N, H],
    k, v [B, T, K, H], positions / segment_ids [B, T]; context_impl (attention.CONTEXT_IMPLS)
    when the context axis is split."""
    tensor = mesh.shape["tensor"]
    check(q.shape[2], k.shape[2], tensor)
    kv_split = k.shape[2] % tensor == 0
    qs, rows = P("data", "context", "tensor", None), P("data", "context")
    kvs = qs if kv_split else P("data", "context", None, None)
    body = functools.partial(device_attention, local=local, context_impl=context_impl,
                             tensor=tensor, kv_split=kv_split)
    # Manual over every mesh axis (Mosaic refuses any automatic one, even of size 1: pipeline
    # stages call device_attention in their own such shard_map, pipeline_manual.py; Shardy
    # does not nest this one inside the pipeline's). check_vma off: Pallas kernels
    # declare outputs without varying-axis types.
    return jax.shard_map(body, mesh=attention.context_mesh(mesh),
                         in_specs=(qs, kvs, kvs, rows, rows), out_specs=qs,
                         axis_names=set(mesh.axis_names), check_vma=False)(
        q, k, v, positions, segment_ids)
