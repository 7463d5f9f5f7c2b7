"""The decode attention kernel on a (data, tensor) mesh: one shard_map, the kernel per device.

XLA cannot partition a Pallas call: left to automatic sharding it would gather the whole
stacked cache onto every device and attend there. So on a sharded model (decode.prepare) the
kernel of backends/decode_attention.py runs inside a shard_map manual over the decode mesh
(decode_setup.make_mesh): each device takes its rows (over `data`) and its query heads (over
`tensor`) with the kv heads they use, and the stacked cache enters with the sharding
decode_setup.cache_shardings gave it, k, v [L, B_data, S, K_tensor, H], so no byte of the cache
moves: each device reads its own shard where it lies (backends/sharded.py does the same for
the training kernels).

Heads: q's N heads split over tensor into contiguous groups, K's the same way, so each rank's
query heads use exactly its kv heads. That needs tensor to divide K; where it does not, the
cache's kv heads are replicated (decode_setup) and `applies` says why the plain form runs.

Axis letters: B batch, T queries, S cache slots, N query heads, K kv heads, H head dim,
L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXES = ("data", "tensor")


def why_not(mesh, n_kv_heads: int) -> str | None:
    """One sentence on why the kernel cannot run per device on `mesh`, or None."""
    if set(mesh.axis_names) != set(AXES):
        return (f"the model is sharded over a mesh with axes {mesh.axis_names}, not "
                f"decode.make_mesh's (data, tensor)")
    if n_kv_heads % mesh.shape["tensor"]:
        return (f"mesh tensor = {mesh.shape['tensor']} does not divide the {n_kv_heads} kv "
                f"heads (each device keeps every kv head); choose a tensor size that divides "
                f"them to decode with the kernel")
    return None


def _device(q, k, v, layer, pos, seg, positions, segment_ids, *, local):
    """The kernel on one device's rows and heads, the cache rebuilt around its shard."""
    from llama_jax import model as model_lib  # noqa: PLC0415 (model imports backends)
    cache = model_lib.LayerCache(k, v, layer[0], None, None, pos, seg)
    return local(q, (k, v), cache, positions, segment_ids)


def sharded_decode_attention(q, kv, cache, positions, segment_ids, *, mesh, local):
    """Backend.decode_attention on `mesh`: `local` (a decode_attention.make kernel) on each
    device's share of q [B, T, N, H], the stacked (k, v) [L, B, S, K, H] and the cache's slot
    positions / segments [B, S]; [B, T, N, H] with q's sharding, or None where `local` leaves
    the case to the plain form."""
    from llama_jax.backends import decode_attention as da  # noqa: PLC0415
    if da.block_for(q, kv, cache, **local.keywords) is None:
        return None  # decided on the global shapes: what it checks is not split
    heads = P(None, "data", None, "tensor", None)
    qs, rows = P("data", None, "tensor", None), P("data", None)
    layer = jnp.asarray(cache.layer, jnp.int32).reshape(1)
    # check_vma off: Pallas kernels declare outputs without varying-axis types.
    return jax.shard_map(functools.partial(_device, local=local), mesh=mesh,
                         in_specs=(qs, heads, heads, P(None), rows, rows, rows, rows),
                         out_specs=qs, axis_names=set(AXES), check_vma=False)(
        q, *kv, layer, cache.pos, cache.seg, positions, segment_ids)


@functools.cache
def make(mesh, local):
    """The sharded piece for `mesh` (cached: one value per mesh and kernel, so a jitted step
    is not retraced for each prepare)."""
    return functools.partial(sharded_decode_attention, mesh=mesh, local=local)


def on_mesh(backend, mesh, n_kv_heads: int):
    """`backend` for a model placed on `mesh` (None: not a NamedSharding's mesh): its decode
    kernel run per device, or dropped, with one log line saying why, where it cannot be."""
    if backend.decode_attention is None:
        return backend
    reason = "the model is not placed by NamedShardings" if mesh is None else why_not(
        mesh, n_kv_heads)
    if reason:
        logging.info("decode attention: the plain form runs: %s.", reason)
        return dataclasses.replace(backend, decode_attention=None)
    return dataclasses.replace(backend, decode_attention=make(mesh, backend.decode_attention))
