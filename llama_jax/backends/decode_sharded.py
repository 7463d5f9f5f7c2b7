"""The decode attention kernel on a (data, tensor) mesh: one shard_map, the kernel per device.

XLA cannot partition a Pallas call (Mosaic refuses it outright; a partitioner could only give
each device the whole stacked cache). So on a sharded model (decode.prepare) the
kernel of backends/decode_attention.py runs inside a shard_map manual over the decode mesh
(decode_setup.make_mesh): each device takes its rows (over `data`) and its query heads (over
`tensor`) with the kv heads they use, and the stacked cache enters with the sharding
decode_setup.cache_shardings gave it, k, v [L, B_data, S, K_tensor, H], so no byte of the cache
moves: each device reads its own shard where it lies (backends/sharded.py does the same for
the training kernels).

Heads: q's N heads split over tensor into contiguous groups. Where tensor divides K, the
cache's K heads split the same way, so each rank's query heads use exactly its kv heads.
Where tensor is a multiple of K (Llama 3 70B, K = 8, on tensor 16), every device keeps all K
heads (decode_setup) and each rank's kernel reads only the one its query heads share,
kv head rank // (tensor / K), as backends/sharded.py's rule for training. Other sizes: the
plain form runs (`why_not`).

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

from llama_jax.backends import decode_attention as da
from llama_jax.backends import sharded

AXES = ("data", "tensor")


def why_not(mesh, config, platform: str) -> str | None:
    """One sentence on why the kernel for `platform` cannot run per device on `mesh` for a
    model of `config`, or None."""
    n_kv_heads = config.n_kv_heads
    if set(mesh.axis_names) != set(AXES):
        return (f"the model is sharded over a mesh with axes {mesh.axis_names}, not "
                f"decode.make_mesh's (data, tensor)")
    tensor = mesh.shape["tensor"]
    if not sharded.kv_heads_follow(n_kv_heads, tensor):
        return (f"mesh tensor = {tensor} neither divides the {n_kv_heads} kv heads nor is a "
                f"multiple of them; choose such a tensor size to decode with the kernel")
    if (n_kv_heads % tensor and platform == "tpu" and n_kv_heads > 1
            and da.tpu_view(config.head_dim, n_kv_heads) == (0, 1, 2, 3, 4)):
        # one kv head of that layout is one row of the cache's K x H tiles: a block Mosaic
        # refuses (its blocks' last two dims are whole tiles or whole dims)
        return (f"on TPU a rank reading one of {n_kv_heads} kv heads of head dim "
                f"{config.head_dim} would need a block of one row of the cache's tiles; "
                f"choose a mesh tensor that divides the kv heads to decode with the kernel")
    return None


def _device(q, k, v, layer, pos, seg, positions, segment_ids, *, local, per_head):
    """The kernel on one device's rows and heads, the cache rebuilt around its shard.
    per_head: the tensor ranks that share one kv head (k, v hold all K), or None."""
    from llama_jax import model as model_lib  # noqa: PLC0415 (model imports backends)
    cache = model_lib.LayerCache(k, v, layer[0], None, None, pos, seg)
    if per_head is None:
        return local(q, (k, v), cache, positions, segment_ids)
    head = jax.lax.axis_index("tensor") // per_head
    return local(q, (k, v), cache, positions, segment_ids, head=head)


def sharded_decode_attention(q, kv, cache, positions, segment_ids, *, mesh, local):
    """Backend.decode_attention on `mesh`: `local` (a decode_attention.make kernel) on each
    device's share of q [B, T, N, H], the stacked (k, v) [L, B, S, K, H] and the cache's slot
    positions / segments [B, S]; [B, T, N, H] with q's sharding, or None where `local` leaves
    the case to the plain form."""
    if da.block_for(q, kv, cache, **local.keywords) is None:
        return None  # decided on the global shapes: what it checks is not split
    tensor, kh = mesh.shape["tensor"], kv[0].shape[3]
    per_head = None if kh % tensor == 0 else tensor // kh
    heads = P(None, "data", None, "tensor" if per_head is None else None, None)
    qs, rows = P("data", None, "tensor", None), P("data", None)
    layer = jnp.asarray(cache.layer, jnp.int32).reshape(1)
    # check_vma off: Pallas kernels declare outputs without varying-axis types.
    return jax.shard_map(functools.partial(_device, local=local, per_head=per_head), mesh=mesh,
                         in_specs=(qs, heads, heads, P(None), rows, rows, rows, rows),
                         out_specs=qs, axis_names=set(AXES), check_vma=False)(
        q, *kv, layer, cache.pos, cache.seg, positions, segment_ids)


@functools.cache
def make(mesh, local):
    """The sharded piece for `mesh` (cached: one value per mesh and kernel, so a jitted step
    is not retraced for each prepare)."""
    return functools.partial(sharded_decode_attention, mesh=mesh, local=local)


def on_mesh(backend, mesh, config):
    """`backend` for a model of `config` placed on `mesh` (None: not a NamedSharding's mesh):
    its decode kernel run per device, or dropped, with one log line saying why, where it
    cannot be."""
    if backend.decode_attention is None:
        return backend
    platform = backend.decode_attention.keywords["platform"]
    reason = "the model is not placed by NamedShardings" if mesh is None else why_not(
        mesh, config, platform)
    if reason:
        logging.info("decode attention: the plain form runs: %s.", reason)
        return dataclasses.replace(backend, decode_attention=None)
    return dataclasses.replace(backend, decode_attention=make(mesh, backend.decode_attention))
