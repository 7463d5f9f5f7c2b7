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

Axis letters: B batch, T query length, S key length (cache slots), D model dim, F ffn dim,
N query heads, K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import attention
from llama_jax.config import ModelConfig
from llama_jax.dense import dense, same_manual_axes, swiglu

Cache = dict[str, jax.Array]  # k, v: [L, B, S, K, H]; pos, seg: [B, S] int32

_INIT = nnx.initializers.normal(stddev=0.02)  # Hugging Face's initializer_range for Llama

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# Execution hooks for sharded steps (set by llama_jax.sharding while a step is traced, so they
# apply to that trace only): `attention(q, k, v, positions, segment_ids)` replaces the no-cache
# attention (context parallelism), `layers(model, x, positions, segment_ids)` runs the stacked
# layers (pipeline parallelism), `activations(x)` constrains the sharding of x [B, T, D] at
# every block boundary. None = the plain single-program code below.
_HOOKS: dict[str, Any] = dict(attention=None, layers=None, activations=None)


@contextlib.contextmanager
def hooks(attention=None, layers=None, activations=None):
    """Routes the no-cache attention and/or the layer stack through other implementations."""
    saved = dict(_HOOKS)
    _HOOKS.update(attention=attention, layers=layers, activations=activations)
    try:
        yield
    finally:
        _HOOKS.update(saved)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_INIT) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


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
    def table():
        angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
        return jnp.cos(angles), jnp.sin(angles)
    if jax.default_backend() != "cpu":
        return table()
    # XLA:CPU fuses cos and sin into every rotation that reads them and evaluates them there
    # for each of the n heads' elements, shared table or not (~65 ms of the bench shape's
    # 0.88 s bf16 train step); a conditional is a fusion boundary. Both branches are the same.
    return jax.lax.cond(positions[0, 0] != jnp.iinfo(jnp.int32).min, table, table)


def apply_rope(x: jax.Array, positions: jax.Array, rope) -> jax.Array:
    """Rotates x [B, T, n, H] by positions [B, T]; half-split pairs (i, i + H/2). `rope` is
    the frequencies (rope_frequencies) or their `rope_table` for these positions, which the
    model computes once per forward for all of its layers."""
    cos, sin = rope if isinstance(rope, tuple) else rope_table(positions, rope)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules. `stack` is a prefix of parameter dimensions: (L,) for the per-layer modules.


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, stack=(), param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((*stack, dim), param_dtype),
                               axes=("layers",) * len(stack) + ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale_rows(y.astype(x.dtype), self.scale[...])


def scale_rows(y: jax.Array, scale: jax.Array) -> jax.Array:
    """y [..., D] * scale [D] in y's dtype (as HF's LlamaRMSNorm, which rounds the normalised
    rows first), with the gain's gradient summed over the rows in float32 and returned in
    scale's dtype. Autodiff of the bf16 product sums bf16 products (less exact), which
    XLA:CPU ran as a separate convert pass and a single-threaded reduce-window per gain."""
    y, scale = same_manual_axes(y, scale)
    return _scale_rows(y, scale)


@jax.custom_vjp
def _scale_rows(y, scale):
    return y * scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)


def _scale_rows_fwd(y, scale):
    return _scale_rows(y, scale), (y, scale)


def _scale_rows_bwd(res, g):
    y, scale = res
    d_y = g.astype(y.dtype) * scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)
    rows = tuple(range(y.ndim - 1))
    d_scale = jnp.sum(g.astype(jnp.float32) * y.astype(jnp.float32), axis=rows)
    return d_y, d_scale.astype(scale.dtype)


_scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, *, stack, rngs: nnx.Rngs):
        dt, pre, lx = jnp.dtype(c.param_dtype), tuple(stack), ("layers",) * len(stack)
        d, n, k, h = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = _param(rngs, (*pre, d, n, h), (*lx, "embed", "q_heads", "head_dim"), dt)
        self.wk = _param(rngs, (*pre, d, k, h), (*lx, "embed", "kv_heads", "head_dim"), dt)
        self.wv = _param(rngs, (*pre, d, k, h), (*lx, "embed", "kv_heads", "head_dim"), dt)
        self.wo = _param(rngs, (*pre, n, h, d), (*lx, "q_heads", "head_dim", "embed"), dt)

    def __call__(self, x, positions, segment_ids, rope, kv=None, kv_pos=None, kv_seg=None):
        """x [B, T, D] -> ([B, T, D], (k, v) written to the cache or None).

        Without a cache the keys are this call's tokens. With one, kv = (k, v) [B, S, K, H]
        and this call's keys are written to slot `positions` of their row (padding, with
        segment 0, is dropped); kv_pos / kv_seg [B, S] describe the slots after the write.
        """
        dt = x.dtype
        # dense: einsums "btd,dnh->btnh" etc. in the compute dtype, fast on XLA:CPU in bf16.
        q, k, v = dense(x, self.wq[...]), dense(x, self.wk[...]), dense(x, self.wv[...])
        q, k = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
        if kv is None and _HOOKS["attention"] is not None:
            out, new_kv = _HOOKS["attention"](q, k, v, positions, segment_ids), None
        elif kv is None:
            out = attention.IMPLS[attention.DEFAULT](q, k, v, positions, segment_ids)
            new_kv = None
        else:
            cache_k, cache_v = kv
            slots = jnp.where(segment_ids != 0, positions, cache_k.shape[1])  # S: dropped
            rows = jnp.arange(x.shape[0])[:, None]
            cache_k = cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop")
            cache_v = cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop")
            mask = attention.attention_mask(positions, segment_ids, kv_pos, kv_seg)
            out = attention.dot_product_attention(q, cache_k.astype(dt), cache_v.astype(dt), mask)
            new_kv = (cache_k, cache_v)
        return dense(out, self.wo[...], n_in=2), new_kv  # btnh,nhd->btd


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, *, stack, rngs: nnx.Rngs):
        dt, pre, lx = jnp.dtype(c.param_dtype), tuple(stack), ("layers",) * len(stack)
        self.w_gate = _param(rngs, (*pre, c.dim, c.ffn_dim), (*lx, "embed", "mlp"), dt)
        self.w_up = _param(rngs, (*pre, c.dim, c.ffn_dim), (*lx, "embed", "mlp"), dt)
        self.w_down = _param(rngs, (*pre, c.ffn_dim, c.dim), (*lx, "mlp", "embed"), dt)

    def __call__(self, x):
        # silu(x·w_gate) * (x·w_up), "btd,df->btf"; then "btf,fd->btd"
        return dense(swiglu(x, self.w_gate[...], self.w_up[...]), self.w_down[...])


class Block(nnx.Module):
    """One transformer layer; constructed with stack=(L,) it holds all layers' parameters."""

    def __init__(self, c: ModelConfig, *, stack=(), rngs: nnx.Rngs):
        pd = jnp.dtype(c.param_dtype)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, stack=stack, param_dtype=pd)
        self.attn = Attention(c, stack=stack, rngs=rngs)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps, stack=stack, param_dtype=pd)
        self.mlp = MLP(c, stack=stack, rngs=rngs)

    def __call__(self, x, positions, segment_ids, rope, kv=None, kv_pos=None, kv_seg=None):
        with jax.named_scope("attention"):
            h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, rope,
                                  kv, kv_pos, kv_seg)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x))
        return x, new_kv


class Llama(nnx.Module):
    """`Llama(config, rngs=nnx.Rngs(0))(tokens [B, T]) -> logits [B, T, V]` (float32)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, pd = config, jnp.dtype(config.param_dtype)
        self.config = config
        self.embed = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), pd)
        self.layers = Block(c, stack=(c.n_layers,), rngs=rngs)
        self.norm = RMSNorm(c.dim, c.norm_eps, param_dtype=pd)
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

    def unembed(self, x) -> jax.Array:
        """Logits [..., V] float32 of final-norm outputs x [..., D]."""
        head = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
        return dense(x, head, out_dtype=jnp.float32)  # ...d,dv->...v

    def features(self, x, positions=None, segment_ids=None, cache: Cache | None = None):
        """(final-norm output [B, T, D], updated cache or None) of embeddings x [B, T, D]."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        new_cache, kv_pos, kv_seg = None, None, None
        if cache is not None:
            kv_pos, kv_seg = _update_slots(cache, positions, segment_ids)
        if cache is None and _HOOKS["layers"] is not None:
            x, new_kv = _HOOKS["layers"](self, x, positions, segment_ids), None
        else:
            x, new_kv = self._layers(x, positions, segment_ids, cache, kv_pos, kv_seg)
        if cache is not None:
            new_cache = dict(k=new_kv[0], v=new_kv[1], pos=kv_pos, seg=kv_seg)
        return self.norm(x), new_cache

    def _layers(self, x, positions, segment_ids, cache, kv_pos, kv_seg, layers=None):
        """Runs the L stacked layers, by lax.scan or unrolled, with the configured remat.
        `layers` (a Block stacked over any number of layers) replaces self.layers: a pipeline
        stage runs its own slice of the stack this way."""
        c = self.config
        graphdef, params = nnx.split(self.layers if layers is None else layers)
        rope = rope_table(positions, rope_frequencies(c))  # once for every layer

        constrain = _HOOKS["activations"] or (lambda x: x)

        def layer(x, layer_params, kv):
            block = nnx.merge(graphdef, layer_params)
            x, kv = block(constrain(x), positions, segment_ids, rope, kv, kv_pos, kv_seg)
            return constrain(x), kv

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[c.remat])
        kvs = None if cache is None else (cache["k"], cache["v"])
        if c.scan_layers:
            def body(x, xs):
                return layer(x, *xs)
            return jax.lax.scan(body, x, (params, kvs))
        outs = []
        for i in range(jax.tree.leaves(params)[0].shape[0]):
            pick = lambda a: a[i]  # noqa: E731
            x, kv = layer(x, jax.tree.map(pick, params), jax.tree.map(pick, kvs))
            outs.append(kv)
        stacked = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stacked


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


def create(config: ModelConfig, seed: int = 0) -> Llama:
    """A randomly initialised model."""
    return Llama(config, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig) -> Llama:
    """The model with ShapeDtypeStructs for parameters: allocates nothing."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def param_count(model: Llama) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def logical_axes(model: Llama) -> Any:
    """The state tree of the model's parameters with each leaf replaced by its axis names."""
    return jax.tree.map(lambda v: v.axes, nnx.state(model, nnx.Param),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
