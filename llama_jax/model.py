"""The LLaMA family as Flax NNX modules, one file for every generation.

Architecture (all generations; differences are ModelConfig fields, never code paths):
- Pre-norm residual blocks with RMSNorm (Zhang & Sennrich 2019; LLaMA paper §2.2).
- SwiGLU feed-forward, `down(silu(gate(x)) * up(x))` (Shazeer 2020; LLaMA §2.2).
- Rotary position embeddings (Su et al. 2021) in the half-split layout of Hugging Face; Meta's
  interleaved layout is a permutation of the q/k projection rows handled by the converter.
  Llama 3.1 frequency scaling (`apply_scaling` in Meta's reference) with its constants in
  `config.RopeScaling`.
- Grouped-query attention (Ainslie et al. 2023; Llama 2 70B and every Llama 3): K kv heads
  serve N query heads.
- Tied (Llama 3.2 1B/3B) or separate output embedding.
- Document masking from segment ids with explicit positions (Llama 3 paper §3.2: attention
  does not cross document boundaries inside a packed row).

Parameters of all layers are stacked along a leading `layers` axis, so scanned and unrolled
execution share one parameter tree (and one checkpoint layout). Every parameter carries its
logical axis names in the `axes` metadata; `sharding.py` maps them to mesh axes.

The math is written once, as functions of arrays (`block`, `self_attention`, `mlp`,
`rms_norm`, `project`), and serves training, prefill and decoding (a KV cache written at
slot = position); the NNX modules declare the parameters. A backend (backends/__init__.py)
may swap in faster forms of some pieces, each tested equal to the plain one.

Axis letters: B batch, T query length, S key length (cache slots), D model dim, F ffn dim,
N query heads, K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import attention
from llama_jax.backends import PLAIN, Backend
from llama_jax.config import ModelConfig

Cache = dict[str, jax.Array]  # k, v: [L, B, S, K, H]; pos, seg: [B, S] int32
Params = dict[str, Any]  # one layer's weights: nnx.to_pure_dict of a Block (see `block`)

_INIT = nnx.initializers.normal(stddev=0.02)  # Hugging Face's initializer_range for Llama

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a sharded step runs the layer stack (sharding.parallel builds it; the default runs
    it as one program): `layers(model, x, positions, segment_ids)` replaces the layer loop
    (pipeline parallelism), `constrain(x)` fixes the sharding of x [B, T, D] at every block
    boundary. Context parallelism is the backend's attention, replaced (sharding.parallel)."""

    layers: Callable | None = None
    constrain: Callable | None = None


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_INIT) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


# ----------------------------------------------------------------------------------------------
# The math, as functions of arrays. `ops` is the backend (backends/__init__.py): where it
# swaps a piece in, that piece equals the plain form written here.


def project(spec: str, x: jax.Array, w, ops: Backend, out_dtype=None, lora=None) -> jax.Array:
    """A weight product einsum(spec, x, w) in x's (compute) dtype with float32 accumulation,
    rounded once to out_dtype (default x's dtype); f32 master weights are cast first.
    lora = {a [*in, R], b [R, *out], scale} (llama_jax.lora) adds scale·(x·a)·b."""
    if ops.einsum is not None:
        y = ops.einsum(spec, x, w, out_dtype)
    else:
        y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        y = y.astype(out_dtype or x.dtype)
    return y if lora is None else y + _low_rank(spec, x, lora).astype(y.dtype)


def _low_rank(spec: str, x, lora) -> jax.Array:
    """scale·(x·a)·b with the letters of `spec`: a takes w's contracted dims, b its others."""
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    ins, outs = "".join(c for c in ws if c in xs), "".join(c for c in ws if c not in xs)
    rows = "".join(c for c in xs if c not in ws)  # B, T or "..."
    xa = jnp.einsum(f"{xs},{ins}r->{rows}r", x, lora["a"].astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum(f"{rows}r,r{outs}->{out}", xa, lora["b"].astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return y * lora["scale"]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, ops: Backend) -> jax.Array:
    """x / rms(x) in float32, rounded to x's dtype, times the gain (as HF's LlamaRMSNorm)."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    if ops.norm_gain is not None:
        return ops.norm_gain(y, scale)
    return y * scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with Llama 3.1 scaling when configured."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = config.rope_scaling
    if s is not None:
        wavelen = 2 * np.pi / inv_freq
        low_freq_wavelen = s.original_max_position / s.low_freq_factor
        high_freq_wavelen = s.original_max_position / s.high_freq_factor
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def rope_table(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, H/2] float32 of the rotation angles positions [B, T] × inv_freq."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x [B, T, n, H] by the angles of rope = (cos, sin) [B, T, H/2] (`rope_table`,
    computed once per forward for all layers); half-split pairs (i, i + H/2)."""
    cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class LayerCache(NamedTuple):
    """Where a layer reads and writes the KV cache: the stacked k, v [L, B, S, K, H], this
    layer's index, each token's slot [B, T] (S: dropped, e.g. padding) and the mask [B, T, S]
    of these tokens over the slots after the write; pos, seg [B, S] are the slots' positions
    and segments after it (what a decode attention kernel masks with)."""

    k: jax.Array
    v: jax.Array
    layer: Any  # int, or a traced index under lax.scan
    slots: jax.Array
    mask: jax.Array
    pos: jax.Array | None = None
    seg: jax.Array | None = None

    def write(self, k, v):
        """Writes this call's k, v [B, T, K, H] at their slots: (this layer's keys and values
        [B, S, K, H] after the write, the stacked (k, v)). Another cache layout (a paged one,
        llama_jax/serve/paged.py) is a type with the same `write` and `mask`."""
        where = (self.layer, jnp.arange(k.shape[0])[:, None], self.slots)
        ck = self.k.at[where].set(k.astype(self.k.dtype), mode="drop")
        cv = self.v.at[where].set(v.astype(self.v.dtype), mode="drop")
        return ck[self.layer], cv[self.layer], (ck, cv)


def self_attention(p: Params, x, positions, segment_ids, rope, ops: Backend,
                   cache: LayerCache | None = None):
    """Grouped-query attention of x [B, T, D]: ([B, T, D], (k, v) with this call's keys
    written, or None). Without a cache the keys are this call's tokens (ops.attend); with one,
    k/v go to their slots of layer `cache.layer` and the queries attend over all slots."""
    q = project("btd,dnh->btnh", x, p["wq"], ops, lora=p.get("wq_lora"))
    k = project("btd,dkh->btkh", x, p["wk"], ops, lora=p.get("wk_lora"))
    v = project("btd,dkh->btkh", x, p["wv"], ops, lora=p.get("wv_lora"))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if cache is None:
        out, new_kv = ops.attend(q, k, v, positions, segment_ids), None
    else:
        keys, values, new_kv = cache.write(k, v)
        out = None if ops.decode_attention is None else ops.decode_attention(
            q, new_kv, cache, positions, segment_ids)  # None: a case the kernel leaves to us
        if out is None:
            out = attention.dot_product_attention(q, keys.astype(x.dtype),
                                                  values.astype(x.dtype), cache.mask)
    return project("btnh,nhd->btd", out, p["wo"], ops, lora=p.get("wo_lora")), new_kv


def mlp(p: Params, x, ops: Backend):
    """SwiGLU: down(silu(x · w_gate) * (x · w_up)), x [B, T, D]."""
    if ops.swiglu is not None and "w_gate_lora" not in p and "w_up_lora" not in p:
        h = ops.swiglu(x, p["w_gate"], p["w_up"])
    else:
        h = (jax.nn.silu(project("btd,df->btf", x, p["w_gate"], ops, lora=p.get("w_gate_lora")))
             * project("btd,df->btf", x, p["w_up"], ops, lora=p.get("w_up_lora")))
    return project("btf,fd->btd", h, p["w_down"], ops, lora=p.get("w_down_lora"))


def block(p: Params, x, positions, segment_ids, rope, ops: Backend, eps: float,
          cache: LayerCache | None = None):
    """One pre-norm transformer layer: (x [B, T, D], (k, v) or None).
    p = {attn_norm: {scale}, attn: {wq, wk, wv, wo}, mlp_norm: {scale}, mlp: {w_gate, w_up,
    w_down}}, the layout of Block's parameters."""
    with jax.named_scope("attention"):
        y = rms_norm(x, p["attn_norm"]["scale"], eps, ops)
        h, new_kv = self_attention(p["attn"], y, positions, segment_ids, rope, ops, cache)
    x = x + ops.row_parallel(h)  # wo's and w_down's partial sums, where the layer runs on shards
    with jax.named_scope("mlp"):
        x = x + ops.row_parallel(mlp(p["mlp"], rms_norm(x, p["mlp_norm"]["scale"], eps, ops), ops))
    return x, new_kv


# ----------------------------------------------------------------------------------------------
# The parameters. `stack` is a prefix of parameter dimensions: (L,) for the per-layer modules.


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, stack=(), param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((*stack, dim), param_dtype),
                               axes=("layers",) * len(stack) + ("norm",))


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, *, stack, rngs: nnx.Rngs):
        dt, pre, lx = jnp.dtype(c.param_dtype), tuple(stack), ("layers",) * len(stack)
        d, n, k, h = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = _param(rngs, (*pre, d, n, h), (*lx, "embed", "q_heads", "head_dim"), dt)
        self.wk = _param(rngs, (*pre, d, k, h), (*lx, "embed", "kv_heads", "head_dim"), dt)
        self.wv = _param(rngs, (*pre, d, k, h), (*lx, "embed", "kv_heads", "head_dim"), dt)
        self.wo = _param(rngs, (*pre, n, h, d), (*lx, "q_heads", "head_dim", "embed"), dt)


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, *, stack, rngs: nnx.Rngs):
        dt, pre, lx = jnp.dtype(c.param_dtype), tuple(stack), ("layers",) * len(stack)
        self.w_gate = _param(rngs, (*pre, c.dim, c.ffn_dim), (*lx, "embed", "mlp"), dt)
        self.w_up = _param(rngs, (*pre, c.dim, c.ffn_dim), (*lx, "embed", "mlp"), dt)
        self.w_down = _param(rngs, (*pre, c.ffn_dim, c.dim), (*lx, "mlp", "embed"), dt)


class Block(nnx.Module):
    """The parameters of one transformer layer (`block`); constructed with stack=(L,) it holds
    all layers' parameters."""

    def __init__(self, c: ModelConfig, *, stack=(), rngs: nnx.Rngs):
        pd = jnp.dtype(c.param_dtype)
        self.attn_norm = RMSNorm(c.dim, stack=stack, param_dtype=pd)
        self.attn = Attention(c, stack=stack, rngs=rngs)
        self.mlp_norm = RMSNorm(c.dim, stack=stack, param_dtype=pd)
        self.mlp = MLP(c, stack=stack, rngs=rngs)


class Llama(nnx.Module):
    """`Llama(config, rngs=nnx.Rngs(0))(tokens [B, T]) -> logits [B, T, V]` (float32).

    `backend` (backends.get(...); default the plain one) and `parallel` (sharding.parallel)
    are how the model runs, not what it is: they are static, part of the graph definition,
    and do not change the parameters or checkpoints."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backend: Backend = PLAIN,
                 parallel: Parallel = Parallel()):
        c, pd = config, jnp.dtype(config.param_dtype)
        self.config, self.backend, self.parallel = config, backend, parallel
        self.embed = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), pd)
        self.layers = Block(c, stack=(c.n_layers,), rngs=rngs)
        self.norm = RMSNorm(c.dim, param_dtype=pd)
        self.lm_head = (None if c.tie_embeddings else
                        _param(rngs, (c.dim, c.vocab_size), ("embed", "vocab"), pd))

    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None):
        """tokens [B, T] int; positions [B, T] (default 0..T-1); segment_ids [B, T] (default 1,
        0 = padding). Returns logits [B, T, V] float32, and the updated cache if one is given.
        """
        return self.from_embeddings(self.embed_tokens(tokens), positions, segment_ids, cache)

    def embed_tokens(self, tokens) -> jax.Array:
        """The embedding rows [B, T, D] of tokens [B, T], in the compute dtype."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)

    def from_embeddings(self, x, positions=None, segment_ids=None, cache: Cache | None = None):
        """The model after the embedding lookup: x [B, T, D] in the compute dtype."""
        x, new_cache = self.features(x, positions, segment_ids, cache)
        logits = self.unembed(x)
        return logits if cache is None else (logits, new_cache)

    def hidden(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """The final-norm output [B, T, D] for tokens [B, T], before the output projection:
        a loss can then project a few tokens at a time (llama_jax.train.loss_fn)."""
        return self.features(self.embed_tokens(tokens), positions, segment_ids)[0]

    def head(self) -> jax.Array:
        """The output projection [D, V] (the input embedding's transpose when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def unembed(self, x) -> jax.Array:
        """Logits [..., V] float32 of final-norm outputs x [..., D]."""
        return project("...d,dv->...v", x, self.head(), self.backend, out_dtype=jnp.float32)

    def features(self, x, positions=None, segment_ids=None, cache: Cache | None = None):
        """(final-norm output [B, T, D], updated cache or None) of embeddings x [B, T, D]."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if cache is None and self.parallel.layers is not None:
            x = self.parallel.layers(self, x, positions, segment_ids)
            new_cache = None
        else:
            x, new_cache = forward_layers(self.config, self.backend, nnx.state(self.layers), x,
                                          positions, segment_ids, cache,
                                          constrain=self.parallel.constrain)
        return rms_norm(x, self.norm.scale[...], self.config.norm_eps, self.backend), new_cache


def forward_layers(c: ModelConfig, ops: Backend, layers, x, positions, segment_ids,
                   cache: Cache | None = None, *, constrain=None, remat: bool = True):
    """The transformer layers on x [B, T, D]: (x, the updated cache or None).

    layers: the stacked parameters (nnx.State of Block(stack=(L,)), or any number of its
    layers: a pipeline stage runs its own slice), run by lax.scan or unrolled as configured,
    under the configured remat; or a tuple of per-layer Params (decoding: one buffer per layer,
    `decode.prepare`), unrolled. `cache` (init_cache) receives each real token's k/v at slot =
    its position; `constrain` fixes the activations' sharding at block boundaries."""
    constrain = constrain or (lambda a: a)
    rope = (ops.rope_table or rope_table)(positions, rope_frequencies(c))  # once, all layers
    at = None
    if cache is not None:
        kv_pos, kv_seg = _update_slots(cache, positions, segment_ids)
        slots = jnp.where(segment_ids != 0, positions, cache["pos"].shape[1])  # S: dropped
        at = (slots, attention.attention_mask(positions, segment_ids, kv_pos, kv_seg), kv_pos,
              kv_seg)

    def layer(x, p, i, kv):
        lc = None if at is None else LayerCache(kv[0], kv[1], i, *at)
        if lc is not None and ops.decode_block is not None:
            fused = ops.decode_block(c, p, x, positions, segment_ids, rope, lc)
            if fused is not None:  # the backend's one-call block (tested equal to `block`)
                return fused
        x, new_kv = block(_pure(p), constrain(x), positions, segment_ids, rope, ops, c.norm_eps,
                          lc)
        return constrain(x), (kv if new_kv is None else new_kv)

    kv = None if cache is None else (cache["k"], cache["v"])
    if isinstance(layers, tuple):  # per-layer buffers
        for i, p in enumerate(layers):
            x, kv = layer(x, p, i, kv)
    else:
        if remat and c.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[c.remat], static_argnums=(2,)
                                   if not c.scan_layers else ())
        n = jax.tree.leaves(layers)[0].shape[0]
        if c.scan_layers:
            def body(carry, xs):
                x, kv = carry
                return layer(x, xs[0], xs[1], kv), None
            (x, kv), _ = jax.lax.scan(body, (x, kv), (layers, jnp.arange(n)))
        else:
            for i in range(n):
                x, kv = layer(x, jax.tree.map(lambda a: a[i], layers), i, kv)  # noqa: B023
    if cache is None:
        return x, None
    return x, dict(k=kv[0], v=kv[1], pos=kv_pos, seg=kv_seg)


def _pure(p) -> Params:
    """Params as plain nested dicts of arrays (an nnx.State slice, or already a dict)."""
    return nnx.to_pure_dict(p) if isinstance(p, nnx.State) else p


def _update_slots(cache: Cache, positions, segment_ids):
    """Slot positions and segments [B, S] after writing this call's tokens at slot = position."""
    b, s = cache["pos"].shape
    slots = jnp.where(segment_ids != 0, positions, s)
    rows = jnp.arange(b)[:, None]
    pos = cache["pos"].at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
    seg = cache["seg"].at[rows, slots].set(segment_ids.astype(jnp.int32), mode="drop")
    return pos, seg


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache for `batch` rows of `max_len` slots; holds only the K kv heads."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                pos=jnp.full((batch, max_len), -1, jnp.int32),
                seg=jnp.zeros((batch, max_len), jnp.int32))


def create(config: ModelConfig, seed: int = 0, backend: Backend = PLAIN,
           parallel: Parallel = Parallel()) -> Llama:
    """A randomly initialised model."""
    return Llama(config, rngs=nnx.Rngs(seed), backend=backend, parallel=parallel)


def abstract(config: ModelConfig, backend: Backend = PLAIN,
             parallel: Parallel = Parallel()) -> Llama:
    """The model with ShapeDtypeStructs for parameters: allocates nothing."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), backend=backend,
                                        parallel=parallel))


def with_backend(model: Llama, backend: Backend, parallel: Parallel | None = None) -> Llama:
    """The same parameters (not copied) run by another backend (and Parallel)."""
    parallel = model.parallel if parallel is None else parallel
    graphdef, _ = nnx.split(abstract(model.config, backend, parallel))
    return nnx.merge(graphdef, nnx.state(model))


def param_count(model: Llama) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def logical_axes(model: Llama) -> Any:
    """The state tree of the model's parameters with each leaf replaced by its axis names."""
    return jax.tree.map(lambda v: v.axes, nnx.state(model, nnx.Param),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
