"""The model's math over a KV cache, on parameters laid out for decoding (`prepare`).

`forward` is model.Llama's math (pre-norm blocks, RoPE, GQA attention, SwiGLU) over `Weights`,
the parameters re-laid once by `prepare`, because XLA:CPU decodes at batch 1 as fast as it
reads the weights and the model's own layout makes it read them slowly:
- One buffer per layer instead of slices of the stacked [L, ...] arrays: a slice inside a
  jitted loop is a copy on XLA:CPU (decoding through the stacked layers ran 2.5× slower).
- 2-D projections [D_in, D_out], so no weight is transposed per token.
- Optionally every projection cut into `pieces` column blocks, each its own buffer: Eigen
  runs a matrix-vector product (batch 1) on one thread whatever the pool size
  (TensorContractionThreadPool.h: `if (n == 1) num_threads = 1`), but XLA's thunk executor
  may run independent dots side by side. Bench shape, f32: two blocks 1.11× one at batch 1
  on a loaded 2-core machine, 1.00× idle (2026-11-23), but 0.65× (115 vs 175 tok/s) on an
  idle 2-core Sapphire Rapids VM (2026-11-30), so one block is the default. Also measured
  there and rejected: q|k|v and gate|up fused into one matrix each (0.90×: the separate
  dots of q, k and v run side by side, one fused dot on one thread); only the output head,
  wo and w_down (the dots that run alone) in two blocks (1.00× head, 0.87× all three);
  batch-1 attention as multiply-and-reduce over the cache instead of two dots (0.82×).
- On CPU, `cpu_kernels` for decode steps (default where it builds; `prepare(kernel=False)`
  for XLA's dots): every projection and the head packed once into 32-column tiles, and each
  block of a decode step (T = 1) one `cpu_kernels.decode_layer` call that also writes the
  cache in place and attends over it (bench shape, same run as the peers: f32 batch 1 327
  tok/s vs ~175 through XLA's dots, batch 8 930; bf16 batch 1 546, batch 8 1,719). Prefills
  (T > 1) of up to `cpu_kernels.PREFILL_ROWS` tokens go through the same product kernel, 8
  rows per pass over the weights (f32 batch 1, prompt 64: time to first token 46 -> 27 ms);
  longer ones use XLA's dot on the unpacked weights (a copy per prefill).
- `weight_dtype="float32"` for a bf16 model on XLA's dots: XLA:CPU converts bf16 dot
  operands to f32 on every call, so in the loop bf16 weights are read, written and read
  again as f32 each token; f32 buffers (activations stay bf16) decoded 1.25-1.3× faster at batch 1
  (tools/bench_worker_decode.py --ab), at twice the weight memory.
Measured and rejected (interleaved micro-benchmarks of the same matvec chain): [F, D]
weights contracting the minor dim (same speed), multiply + reduce instead of dot (25× slower:
XLA:CPU's reduction loop is not vectorised across rows), padding batch 1 to 2 rows, and
XLA's oneDNN / XNNPACK / YNNPACK dot flags (bf16 operands still converted).

On XLA's path the cache is written with one scatter per layer into the stacked buffer; prefill
computes only the last token's logits.

Axis letters: B batch, T tokens, S cache slots, D model dim, F ffn dim, N query heads,
K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import attention, cpu_kernels
from llama_jax import model as model_lib
from llama_jax.config import ModelConfig

@functools.partial(jax.tree_util.register_dataclass, data_fields=["embed", "norm", "head",
                                                                  "layers"], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Weights:
    """The model's parameters laid out for decoding (`prepare(model)`), in the compute dtype.

    layers: one dict per layer (a separate buffer each, see the module doc): attn_norm,
    mlp_norm [D]; projections as tuples of column blocks whose concatenation is wq [D, N*H],
    wk / wv [D, K*H], wo [N*H, D], w_gate / w_up [D, F], w_down [F, D].
    embed [V, D]; head: tuple of row blocks of the output embedding [V, D] (the input
    embedding when tied); norm [D]. With the CPU kernel (`prepare(kernel=True)`) every
    projection and the head ([D, V]) are instead one `cpu_kernels.Packed` each.
    """

    config: ModelConfig
    embed: jax.Array
    norm: jax.Array
    head: tuple[jax.Array, ...] | cpu_kernels.Packed
    layers: tuple[dict, ...]


def _blocks(w, pieces: int, axis: int) -> tuple[jax.Array, ...]:
    """w cut into `pieces` equal blocks along `axis` (fewer if the axis does not divide)."""
    n = w.shape[axis]
    pieces = max(p for p in range(1, pieces + 1) if n % p == 0)
    return tuple(jnp.split(w, pieces, axis=axis))


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _relayout(graphdef, state, pieces: int, weight_dtype, kernel: bool):
    model = nnx.merge(graphdef, state)
    c = model.config
    dt, wdt = jnp.dtype(c.dtype), jnp.dtype(weight_dtype or c.dtype)
    a, m = model.layers.attn, model.layers.mlp
    stacked = dict(
        wq=a.wq[...].reshape(c.n_layers, c.dim, -1), wk=a.wk[...].reshape(c.n_layers, c.dim, -1),
        wv=a.wv[...].reshape(c.n_layers, c.dim, -1), wo=a.wo[...].reshape(c.n_layers, -1, c.dim),
        w_gate=m.w_gate[...], w_up=m.w_up[...], w_down=m.w_down[...])
    norms = dict(attn_norm=model.layers.attn_norm.scale[...],
                 mlp_norm=model.layers.mlp_norm.scale[...])
    cols = cpu_kernels.Packed.of if kernel else functools.partial(_blocks, pieces=pieces, axis=1)
    layers = tuple(
        {**{k: w[i].astype(dt) for k, w in norms.items()},
         **{k: cols(w[i].astype(wdt)) for k, w in stacked.items()}}
        for i in range(c.n_layers))
    head = (model.embed[...] if c.tie_embeddings else model.lm_head[...].T).astype(wdt)  # [V, D]
    head = cpu_kernels.Packed.of(head.T) if kernel else _blocks(head, pieces, axis=0)
    return model.embed[...].astype(dt), model.norm.scale[...].astype(dt), head, layers


def prepare(model: model_lib.Llama, pieces: int = 1, weight_dtype=None,
            kernel: bool | None = None) -> Weights:
    """The decoding layout of a model's parameters (a copy; shardings carry over).

    pieces: column blocks per projection for XLA's dots (module doc: one block is the default
    since two measured 0.65-1.11x of it depending on the machine). kernel: decode steps through
    `cpu_kernels` (weights packed once); default on where it is available, the model is on one
    device and pieces is 1.
    """
    sharded = any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(nnx.state(model)))
    if kernel is None:
        kernel = pieces == 1 and not sharded and cpu_kernels.available()
    elif kernel and (sharded or pieces != 1 or not cpu_kernels.available()):
        raise ValueError("prepare(kernel=True) needs an unsharded model, pieces=1 and the CPU "
                         "kernel (a C++ compiler, a CPU backend, LLAMA_JAX_CPU_KERNELS not 0).")
    embed, norm, head, layers = _relayout(*nnx.split(model), pieces, weight_dtype, kernel)
    return Weights(model.config, embed, norm, head, layers)


# ----------------------------------------------------------------------------------------------
# The forward pass over the cache.


def _rms_norm(x, scale, eps):
    """As model.RMSNorm: normalise in float32, scale in the compute dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale[None, None, :]


def _project(x, blocks):
    """x [B, T, D_in] @ the concatenation of the column blocks [D_in, D_out_i], or @ a packed
    weight: the kernel for up to cpu_kernels.PREFILL_ROWS tokens, XLA's dot for more."""
    if isinstance(blocks, cpu_kernels.Packed):
        kernel = x.shape[0] * x.shape[1] <= cpu_kernels.PREFILL_ROWS
        return cpu_kernels.matmul(x, blocks, kernel=kernel).astype(x.dtype)
    ys = [(x @ w).astype(x.dtype) for w in blocks]
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)


class _At(NamedTuple):
    """Where a layer reads and writes the cache: its index, each token's slot [B, T] (S drops
    it), the tokens' segments [B, T], the cache's positions and segments [B, S] with these
    tokens written, and the attention mask [B, T, S] they give."""

    layer: int
    slots: jax.Array
    segments: jax.Array
    kv_pos: jax.Array
    kv_seg: jax.Array
    mask: jax.Array


def _layer(c: ModelConfig, p, x, positions, rope, at: _At, ck, cv):
    """Block `at.layer` on x [B, T, D]: (x, ck, cv) with its k/v written to the cache
    ck, cv [L, B, S, K, H] at `at.slots`; rope = model.rope_table(positions, ...)."""
    b, t, _ = x.shape
    n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
    if isinstance(p["wq"], cpu_kernels.Packed) and t == 1:  # a decode step: the CPU kernel
        x, ck, cv = cpu_kernels.decode_layer(
            x[:, 0], p, rope[0][:, 0], rope[1][:, 0], at.slots[:, 0], positions[:, 0],
            at.segments[:, 0], at.kv_pos, at.kv_seg, ck, cv, layer=at.layer, n_heads=n,
            eps=c.norm_eps)
        return x[:, None], ck, cv
    y = _rms_norm(x, p["attn_norm"], c.norm_eps)
    q = model_lib.apply_rope(_project(y, p["wq"]).reshape(b, t, n, h), positions, rope)
    kk = model_lib.apply_rope(_project(y, p["wk"]).reshape(b, t, k, h), positions, rope)
    vv = _project(y, p["wv"]).reshape(b, t, k, h)
    where = (at.layer, jnp.arange(b)[:, None], at.slots)
    ck = ck.at[where].set(kk.astype(ck.dtype), mode="drop")
    cv = cv.at[where].set(vv.astype(cv.dtype), mode="drop")
    out = attention.dot_product_attention(q, ck[at.layer].astype(x.dtype),
                                          cv[at.layer].astype(x.dtype), at.mask)
    x = x + _project(out.reshape(b, t, n * h), p["wo"])
    y = _rms_norm(x, p["mlp_norm"], c.norm_eps)
    gated = jax.nn.silu(_project(y, p["w_gate"])) * _project(y, p["w_up"])
    return x + _project(gated, p["w_down"]), ck, cv


def forward(w: Weights, tokens, positions, segments, cache, logits_at=None):
    """The model on tokens [B, T] at positions [B, T] over the cache: (logits [B, T, V] f32, cache).

    Each real token's k/v goes to slot = its position in place (segment 0, padding, is not
    written); the math is model.Llama's, layers unrolled over `Weights.layers`. logits_at [B]:
    only the logits at these indices of T, [B, 1, V] (prefill needs the last token's only).
    """
    c, b = w.config, tokens.shape[0]
    slots = jnp.where(segments != 0, positions, cache["pos"].shape[1])  # S: dropped
    rows = jnp.arange(b)[:, None]
    kv_pos = cache["pos"].at[rows, slots].set(positions, mode="drop")
    kv_seg = cache["seg"].at[rows, slots].set(segments, mode="drop")
    mask = attention.attention_mask(positions, segments, kv_pos, kv_seg)
    rope = model_lib.rope_table(positions, model_lib.rope_frequencies(c))  # once per step
    ck, cv = cache["k"], cache["v"]
    x = jnp.take(w.embed, tokens, axis=0)
    for i, p in enumerate(w.layers):
        with jax.named_scope(f"layer_{i}"):
            at = _At(i, slots, segments, kv_pos, kv_seg, mask)
            x, ck, cv = _layer(c, p, x, positions, rope, at, ck, cv)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = _rms_norm(x, w.norm, c.norm_eps)
    if isinstance(w.head, cpu_kernels.Packed):
        rows = x.shape[0] * x.shape[1]
        logits = cpu_kernels.matmul(x, w.head, kernel=rows <= cpu_kernels.PREFILL_ROWS)
    else:
        logits = [jnp.einsum("btd,vd->btv", x, h, preferred_element_type=jnp.float32)
                  for h in w.head]
        logits = logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)
    return logits, dict(k=ck, v=cv, pos=kv_pos, seg=kv_seg)
