"""int8 weight-only quantization of the decoding weights: per output channel, symmetric.

    weights = quantize.int8(decode.prepare(model, kernel=False))
    decode.generate(weights, prompts, 32)          # or serve.Engine(weights, ...)

Each projection w (and the head, and the embedding table per row) is stored as int8 q and a
float32 scale per output channel, w ≈ q · scale with scale = max|w| / 127 over the contracted
dimensions (LLM.int8's vector-wise weight scaling without its outliers, Dettmers et al. 2022;
the default of weight-only int8 in TensorRT-LLM and vLLM). The weights stay int8 at rest (a
quarter of float32, half of bfloat16; the scales add one float per channel) and are converted
to the compute dtype inside the jitted product, where XLA fuses the convert into the dot's
operand. Activations and the KV cache keep the compute dtype.

Written here rather than through qwix or AQT: neither is installed, both bring their own
JAX/Flax pins, and weight-only per-channel int8 is the two functions below.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llama_jax.decode_forward import Weights

# The dimensions each weight contracts in model.project (its others are output channels).
CONTRACTED = dict(wq=(0,), wk=(0,), wv=(0,), wo=(0, 1), w_gate=(0,), w_up=(0,), w_down=(0,))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class Int8:
    """q int8 of the weight's shape; scale float32 with the contracted dimensions kept as 1;
    dtype the compute dtype it dequantizes to."""

    q: jax.Array
    scale: jax.Array
    dtype: str

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def astype(self, dtype) -> jax.Array:
        """The dequantized weight (what model.project does to every weight: w.astype)."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def rows(self, ids) -> jax.Array:
        """Dequantized rows ids [...] of a [V, D] table (the embedding lookup)."""
        q, s = jnp.take(self.q, ids, axis=0), jnp.take(self.scale, ids, axis=0)
        return (q.astype(jnp.float32) * s).astype(self.dtype)


def quantize(w: jax.Array, contracted: tuple[int, ...]) -> Int8:
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=contracted, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
    return Int8(q, scale, jnp.dtype(w.dtype).name)


def _dequantizing(einsum):
    """A backend einsum that first dequantizes an Int8 weight (inside the same jit)."""
    def project(spec, x, w, out_dtype):
        w = w.astype(x.dtype) if isinstance(w, Int8) else w
        if einsum is not None:
            return einsum(spec, x, w, out_dtype)
        y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
        return y.astype(out_dtype or x.dtype)
    return project


def int8(weights: Weights) -> Weights:
    """The weights with projections, head and embedding in int8. Needs plain (unpacked)
    weights: decode.prepare(model, kernel=False)."""
    if weights.backend.decode_block is not None or not isinstance(weights.head, jax.Array):
        raise ValueError("quantize.int8 needs unpacked weights; prepare them with "
                         "decode.prepare(model, kernel=False).")
    layers = tuple({**p, "attn": {k: quantize(v, CONTRACTED[k]) for k, v in p["attn"].items()},
                    "mlp": {k: quantize(v, CONTRACTED[k]) for k, v in p["mlp"].items()}}
                   for p in weights.layers)
    # The SwiGLU kernel of a backend takes plain arrays; the plain SwiGLU goes through project.
    ops = dataclasses.replace(weights.backend, einsum=_dequantizing(weights.backend.einsum),
                              swiglu=None)
    return dataclasses.replace(weights, backend=ops, layers=layers,
                               head=quantize(weights.head, (0,)),
                               embed=quantize(weights.embed, (1,)))


def nbytes(weights: Weights) -> int:
    """Bytes the weights hold (quantized or not)."""
    return sum(x.nbytes for x in jax.tree.leaves(weights))
