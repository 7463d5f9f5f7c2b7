"""The cpu backend: XLA:CPU's fast forms and C++ kernels behind backends.Backend.

What it swaps in, each tested equal to the plain form (tests/test_backends.py and the tests of
each piece); measured gains are in BENCHMARKS.md:
- `einsum`: dense.py's products (bf16 x bf16 -> f32 dots with a custom VJP in the forms XLA:CPU
  runs on its bf16 kernels; the product kernel for decode-packed weights);
- `norm_gain`: dense.scale_rows (the gain's gradient summed in f32);
- `rope_table`: the table behind a conditional (a fusion boundary on XLA:CPU);
- `attention` "full" (the default): attention.materialized_attention (the C++ bf16 kernel,
  causal query blocks, whole scores with a custom VJP);
- `swiglu`: the gate/up products with the C++ elementwise kernel for bf16;
- `fused_update`: optim.fused_update (AdamW in one C++ pass per f32 parameter);
- `decode_pack` / `decode_block`: 32-column packed weights and one C++ call per block of a
  one-token decode step (csrc/decode.cc);
- host memory: host_memory.retain_freed_memory (backends.prepare_host).

Every kernel is built on first use with the system C++ compiler (kernels.py); without one
(or with LLAMA_JAX_CPU_KERNELS=0) each piece keeps its XLA form, with one log line.
"""

from __future__ import annotations

import functools

import jax

from llama_jax.backends import Backend
from llama_jax.backends.cpu import attention, dense, kernels, optim


def decode_pack(w: jax.Array, n_in: int):
    """A projection or the head [*I, *O] packed for the product kernel (n_in leading dims)."""
    return kernels.Packed.of(w, n_in)


def decode_block(c, p, x, positions, segment_ids, rope, cache):
    """model.block for one new token per row (x [B, 1, D]) on packed weights, as one kernel
    call that also writes the k/v into the stacked cache in place: (x, (k, v)); None where it
    does not apply (more than one token per row, unpacked weights)."""
    if x.shape[1] != 1 or not isinstance(p["attn"]["wq"], kernels.Packed):
        return None
    flat = dict(attn_norm=p["attn_norm"]["scale"], mlp_norm=p["mlp_norm"]["scale"],
                **p["attn"], **p["mlp"])
    cos, sin = rope
    out, ck, cv = kernels.decode_layer(
        x[:, 0], flat, cos[:, 0], sin[:, 0], cache.slots[:, 0], positions[:, 0],
        segment_ids[:, 0], cache.pos, cache.seg, cache.k, cache.v, layer=cache.layer,
        n_heads=c.n_heads, eps=c.norm_eps)
    return out[:, None], (ck, cv)


@functools.cache
def make(*, causal_blocks: bool = True, attention_kernel: bool = True,
         swiglu_kernel: bool = True, fused_adamw: bool = True,
         decode_kernel: bool = True) -> Backend:
    """The cpu backend; the switches turn single pieces off (for A/B benchmarks and tests)."""
    full = functools.partial(attention.materialized_attention,
                             causal_block=attention.CAUSAL_BLOCK if causal_blocks else 0,
                             kernel=attention_kernel)
    decode = decode_kernel and kernels.available()
    return Backend(
        name="cpu", einsum=dense.einsum, norm_gain=dense.scale_rows, rope_table=dense.rope_table,
        attentions=(("full", full),), default_attention="full",
        swiglu=functools.partial(dense.swiglu, kernel=swiglu_kernel),
        fused_update=optim.fused_update if fused_adamw else None,
        decode_pack=decode_pack if decode else None,
        decode_block=decode_block if decode else None)
