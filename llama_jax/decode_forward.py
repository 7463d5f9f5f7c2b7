"""The model's forward pass over a KV cache, on parameters laid out once for decoding.

`forward` runs model.py's own math (`model.forward_layers`, `model.rms_norm`,
`model.project`) on `Weights`, the parameters re-laid once by `prepare`:
- one buffer per layer instead of slices of the stacked [L, ...] arrays (on XLA:CPU a slice
  inside a jitted loop is a copy: decoding through the stacked layers ran 2.5x slower), in the
  compute dtype, so no weight is converted per token;
- where the backend packs weights for its decode kernels (backends/cpu: 32-column tiles for
  the C++ product and a whole block per call for one-token steps), packed once here.

Axis letters: B batch, T tokens, S cache slots, D model dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import model as model_lib
from llama_jax.backends import Backend, decode_sharded
from llama_jax.config import ModelConfig


@functools.partial(jax.tree_util.register_dataclass, data_fields=["embed", "norm", "head",
                                                                  "layers"],
                   meta_fields=["config", "backend"])
@dataclasses.dataclass(frozen=True)
class Weights:
    """The model's parameters laid out for decoding (`prepare(model)`), in the compute dtype.

    embed [V, D]; norm [D]; head [D, V] (the input embedding's transpose when tied); layers:
    one model.Params dict per layer, each its own buffer. Projections and the head are arrays,
    or the backend's packed form (`backend.decode_pack`)."""

    config: ModelConfig
    backend: Backend
    embed: jax.Array
    norm: jax.Array
    head: Any
    layers: tuple[dict, ...]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _relayout(graphdef, state, pack):
    model = nnx.merge(graphdef, state)
    c = model.config
    dt = jnp.dtype(c.dtype)
    pack = pack or (lambda w, n_in: w)
    stacked = nnx.to_pure_dict(nnx.state(model.layers))
    n_in = dict(wo=2)  # wo [N, H, D] contracts two dims; the others one

    def one(i):
        def leaf(path, a):
            name = path[-1].key
            a = a[i].astype(dt)
            return a if name == "scale" else pack(a, n_in.get(name, 1))
        return jax.tree_util.tree_map_with_path(leaf, stacked)
    layers = tuple(one(i) for i in range(c.n_layers))
    head = pack(model.head().astype(dt), 1)
    return model.embed[...].astype(dt), model.norm.scale[...].astype(dt), head, layers


def _mesh(model):
    """The mesh the model's parameters are placed on, or None (not NamedShardings)."""
    meshes = {getattr(x.sharding, "mesh", None) for x in jax.tree.leaves(nnx.state(model))}
    return meshes.pop() if len(meshes) == 1 else None


def prepare(model: model_lib.Llama, kernel: bool | None = None) -> Weights:
    """The decoding layout of a model's parameters (a copy; shardings carry over).

    kernel: pack the weights for the model's backend's decode kernels (`decode_pack`);
    default where the backend has them and the model is on one device. kernel=True says why
    when it cannot; kernel=False keeps plain arrays (the plain math on any backend)."""
    ops = model.backend
    sharded = any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(nnx.state(model)))
    if kernel is None:
        kernel = ops.decode_pack is not None and not sharded
    elif kernel and (sharded or ops.decode_pack is None):
        raise ValueError(f"prepare(kernel=True) needs an unsharded model on a backend with "
                         f"decode kernels (the cpu backend with its C++ kernel built); this "
                         f"model's backend is {ops.name!r}"
                         f"{' and it is sharded' if sharded else ''}.")
    pack = ops.decode_pack if kernel else None
    graphdef, state = nnx.split(model)
    embed, norm, head, layers = _relayout(graphdef, state, pack)
    if not kernel:  # the fused decode block runs on packed weights only
        ops = dataclasses.replace(ops, decode_block=None)
    if sharded:  # XLA cannot partition a Pallas call: the kernel runs per device
        ops = decode_sharded.on_mesh(ops, _mesh(model), model.config)
    return Weights(model.config, ops, embed, norm, head, layers)


def forward(w: Weights, tokens, positions, segments, cache, logits_at=None):
    """The model on tokens [B, T] at positions [B, T] over the cache: (logits [B, T, V] f32,
    cache). Each real token's k/v goes to slot = its position in place (segment 0, padding,
    is not written). logits_at [B]: only the logits at these indices of T, [B, 1, V]
    (prefill needs the last token's only)."""
    c, ops = w.config, w.backend
    # An int8 table (llama_jax/quantize.py) dequantizes the rows it gives.
    x = w.embed.rows(tokens) if hasattr(w.embed, "rows") else jnp.take(w.embed, tokens, axis=0)
    x, cache = model_lib.forward_layers(c, ops, w.layers, x, positions, segments, cache,
                                        remat=False)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = model_lib.rms_norm(x, w.norm, c.norm_eps, ops)
    return model_lib.project("btd,dv->btv", x, w.head, ops, out_dtype=jnp.float32), cache
