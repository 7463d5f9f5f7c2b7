"""Autoregressive decoding: prefill, decode_step and a generate loop compiled once.

    out = decode.generate(model, [[1, 306, 4658], [1, 450]], max_new_tokens=64,
                          sampling=SamplingParams(temperature=0.7, top_p=0.9), seed=0)
    out.tokens[b, :out.lengths[b]], out.logprobs[b, :out.lengths[b]]

How a batch of prompts of different lengths runs (positions and masks as in attention.py):
- Prompts are right-padded to a bucket length P (a power of two), so a new prompt length
  reuses the compiled programs; padding carries segment id 0, so it is neither attended to
  nor written to the cache.
- `prefill` runs all prompts in one forward pass, writing each real token's k/v at slot =
  its position, and returns the logits of every row's last real token.
- `decode_step` feeds each row's last token at its own position [B, 1]; the cache holds only
  the K kv heads ([L, B, S, K, H], model.init_cache) and is donated, so XLA updates it in place.
- `generate` = `start` (fresh cache, prefill, first sample) + `loop` (`decode_step` in a
  `lax.while_loop` until every row has emitted a stop token or max_new_tokens): one compiled
  pair per (batch, P bucket, new-token bucket), no host round trip per token.

Speed (XLA:CPU, batch 1 is memory-bound): `forward` is model.Llama's math over `Weights`, the
parameters re-laid once by `prepare` — one buffer per layer instead of slices of the stacked
[L, ...] arrays (a slice inside a jitted loop is a copy on XLA:CPU: decoding through the
model's stacked layers ran 2.5× slower per token on the bench shape), and 2-D projections so no
weight is transposed per token. The cache is written with one scatter per layer into the
stacked buffer, in place; prefill computes only the last token's logits.

Determinism: step t samples with `fold_in(PRNGKey(seed), t)`, so a seed fixes the output.

Sharding: `shard(model, mesh)` places weights by their logical axes (heads, mlp and vocab
over `tensor`), the batch and the cache go over `data` and the cache's kv heads over
`tensor` (replicated when `tensor` does not divide K).

Axis letters: B batch, P prompt bucket, N new-token buffer, S cache slots, V vocab,
K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import attention
from llama_jax import model as model_lib
from llama_jax import sampling as sampling_lib
from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.sampling import SamplingParams

MAX_STOP_IDS = 8  # stop ids are padded to this many (with -1) so their count does not recompile
TRACES = {"start": 0, "loop": 0, "decode_step": 0}  # Python-side trace counters, read by tests
# The current generate() call's stream callback. The compiled loop calls `_stream` (one static
# function, so a new callback does not recompile), which forwards here.
_STREAM_TARGET: list[Callable | None] = [None]


def _stream(step, tokens, lengths):
    if _STREAM_TARGET[0] is not None:
        _STREAM_TARGET[0](step, tokens, lengths)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["embed", "norm", "head",
                                                                  "layers"], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Weights:
    """The model's parameters laid out for decoding (`prepare(model)`), in the compute dtype.

    The stacked [L, ...] layer parameters are split into one dict per layer: a layer's weight
    slice inside a jitted loop is a copy on XLA:CPU, a separate buffer is not. Projections are 2-D so every matmul reads its weight as stored:
    wq [D, N*H], wk / wv [D, K*H], wo [N*H, D], w_gate / w_up [D, F], w_down [F, D],
    attn_norm / mlp_norm [D]. embed [V, D]; head [V, D] (the embedding when tied); norm [D].
    """

    config: ModelConfig
    embed: jax.Array
    norm: jax.Array
    head: jax.Array
    layers: tuple[dict[str, jax.Array], ...]


@functools.partial(jax.jit, static_argnums=0)
def _split_layers(graphdef, state):
    model = nnx.merge(graphdef, state)
    c = model.config
    dt = jnp.dtype(c.dtype)
    a, m = model.layers.attn, model.layers.mlp
    stacked = dict(
        attn_norm=model.layers.attn_norm.scale[...], mlp_norm=model.layers.mlp_norm.scale[...],
        wq=a.wq[...].reshape(c.n_layers, c.dim, -1), wk=a.wk[...].reshape(c.n_layers, c.dim, -1),
        wv=a.wv[...].reshape(c.n_layers, c.dim, -1), wo=a.wo[...].reshape(c.n_layers, -1, c.dim),
        w_gate=m.w_gate[...], w_up=m.w_up[...], w_down=m.w_down[...])
    layers = tuple({k: w[i].astype(dt) for k, w in stacked.items()} for i in range(c.n_layers))
    head = model.embed[...] if c.tie_embeddings else model.lm_head[...].T
    return model.embed[...].astype(dt), model.norm.scale[...].astype(dt), head.astype(dt), layers


def prepare(model: model_lib.Llama) -> Weights:
    """The decoding layout of a model's parameters (a copy; shardings carry over)."""
    embed, norm, head, layers = _split_layers(*nnx.split(model))
    return Weights(model.config, embed, norm, head, layers)


# ----------------------------------------------------------------------------------------------
# The forward pass over the cache.


def _rms_norm(x, scale, eps):
    """As model.RMSNorm: normalise in float32, scale in the compute dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale[None, None, :]


def forward(w: Weights, tokens, positions, segments, cache, logits_at=None):
    """The model on tokens [B, T] at positions [B, T] over the cache: (logits [B, T, V] f32, cache).

    Each real token's k/v goes to slot = its position in place (segment 0, padding, is not
    written); the math is model.Llama's, layers unrolled over `Weights.layers`. logits_at [B]:
    only the logits at these indices of T, [B, 1, V] (prefill needs the last token's only).
    """
    c, (b, t) = w.config, tokens.shape
    n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
    slots = jnp.where(segments != 0, positions, cache["pos"].shape[1])  # S: dropped
    rows = jnp.arange(b)[:, None]
    kv_pos = cache["pos"].at[rows, slots].set(positions, mode="drop")
    kv_seg = cache["seg"].at[rows, slots].set(segments, mode="drop")
    mask = attention.attention_mask(positions, segments, kv_pos, kv_seg)
    inv_freq = model_lib.rope_frequencies(c)
    ck, cv = cache["k"], cache["v"]
    x = jnp.take(w.embed, tokens, axis=0)
    for i, p in enumerate(w.layers):
        with jax.named_scope(f"layer_{i}"):
            y = _rms_norm(x, p["attn_norm"], c.norm_eps)
            q = model_lib.apply_rope((y @ p["wq"]).reshape(b, t, n, h), positions, inv_freq)
            kk = model_lib.apply_rope((y @ p["wk"]).reshape(b, t, k, h), positions, inv_freq)
            ck = ck.at[i, rows, slots].set(kk.astype(ck.dtype), mode="drop")
            cv = cv.at[i, rows, slots].set((y @ p["wv"]).reshape(b, t, k, h).astype(cv.dtype),
                                           mode="drop")
            out = attention.dot_product_attention(q, ck[i].astype(x.dtype), cv[i].astype(x.dtype),
                                                  mask)
            x = x + out.reshape(b, t, n * h) @ p["wo"]
            y = _rms_norm(x, p["mlp_norm"], c.norm_eps)
            x = x + (jax.nn.silu(y @ p["w_gate"]) * (y @ p["w_up"])) @ p["w_down"]
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = _rms_norm(x, w.norm, c.norm_eps)
    logits = jnp.einsum("btd,vd->btv", x, w.head, preferred_element_type=jnp.float32)
    return logits, dict(k=ck, v=cv, pos=kv_pos, seg=kv_seg)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the loop carries between tokens; all fields are arrays.

    cache: the KV cache (model.init_cache): k, v [L, B, S, K, H], pos, seg [B, S].
    last: [B] int32, the token each row feeds next (its latest emitted token).
    position: [B] int32, the position (= cache slot) that `last` is written to.
    step: [] int32, how many tokens have been emitted so far (the next buffer column).
    done: [B] bool, the row has emitted a stop token or its max_new_tokens.
    lengths: [B] int32, tokens emitted per row, the stop token included.
    tokens: [B, N] int32, emitted tokens; 0 past `lengths`.
    logprobs: [B, N] float32, the model's log-probability of each emitted token (log-softmax at
      temperature 1, before sampling filters); 0 past `lengths`.
    key: the PRNG key of the run; step t samples with fold_in(key, t).
    """

    cache: model_lib.Cache
    last: jax.Array
    position: jax.Array
    step: jax.Array
    done: jax.Array
    lengths: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Host arrays: tokens [B, N] int32 and logprobs [B, N] float32, valid up to lengths [B]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray

    def ids(self, b: int) -> list[int]:
        return self.tokens[b, :self.lengths[b]].tolist()


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): lengths that share a bucket share a compile."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# The pure steps.


def prefill(weights: Weights, tokens, lengths, cache):
    """Runs the prompts tokens [B, P] (right-padded; lengths [B] real tokens) in one pass.

    Returns the logits [B, V] of each row's last real token and the cache holding the prompts.
    """
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    logits, cache = forward(weights, tokens, positions, segments, cache, logits_at=lengths - 1)
    return logits[:, 0], cache


def _emit(state: DecodeState, tok, logprob, stop_ids, max_new) -> DecodeState:
    """Records tokens [B] as column `state.step`; rows already done record 0 and stay done."""
    active = ~state.done
    tok = jnp.where(active, tok, 0)
    logprob = jnp.where(active, logprob, 0.0)
    col = (jnp.int32(0), state.step)
    tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], col)
    logprobs = jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], col)
    lengths = state.lengths + active.astype(jnp.int32)
    stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    done = state.done | (active & stopped) | (lengths >= max_new)
    return dataclasses.replace(
        state, last=jnp.where(active, tok, state.last), step=state.step + 1, done=done,
        lengths=lengths, tokens=tokens, logprobs=logprobs)


def _decode_step(weights: Weights, state: DecodeState, sampling, stop_ids, max_new):
    """Feeds each row's last token at its position, samples and records the next token."""
    TRACES["decode_step"] += 1
    b = state.last.shape[0]
    logits, cache = forward(weights, state.last[:, None], state.position[:, None],
                            jnp.ones((b, 1), jnp.int32), state.cache)
    key = jax.random.fold_in(state.key, state.step)
    tok, logprob = sampling_lib.sample(logits[:, 0], key, **sampling)
    position = state.position + (~state.done).astype(jnp.int32)
    state = dataclasses.replace(state, cache=cache, position=position)
    return _emit(state, tok, logprob, stop_ids, max_new)


# One decode step on its own (for callers that drive the loop from the host, e.g. servers).
decode_step = jax.jit(_decode_step, donate_argnames="state")


@functools.partial(jax.jit, static_argnames=("cache_len", "n_buffer", "mesh"))
def start(weights: Weights, tokens, lengths, key, sampling, stop_ids, max_new, *,
          cache_len: int, n_buffer: int, mesh=None) -> DecodeState:
    """A fresh cache, prefill, and the first token: the state the decode loop starts from.

    tokens [B, P] right-padded prompts with lengths [B]; key the run's PRNG key; sampling the
    `SamplingParams.arrays()`; stop_ids [MAX_STOP_IDS] (-1 unused); max_new [] the tokens to
    emit per row, at most n_buffer; cache_len the slots S (>= longest prompt + max_new).
    """
    TRACES["start"] += 1
    config, b = weights.config, tokens.shape[0]
    cache = model_lib.init_cache(config, b, cache_len)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(mesh, config))
    logits, cache = prefill(weights, tokens, lengths, cache)
    tok, logprob = sampling_lib.sample(logits, jax.random.fold_in(key, 0), **sampling)
    state = DecodeState(
        cache=cache, last=tok, position=lengths.astype(jnp.int32), step=jnp.int32(0),
        done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
        tokens=jnp.zeros((b, n_buffer), jnp.int32),
        logprobs=jnp.zeros((b, n_buffer), jnp.float32), key=key)
    return _emit(state, tok, logprob, stop_ids, max_new)


@functools.partial(jax.jit, static_argnames=("stream",), donate_argnames=("state",))
def loop(weights: Weights, state: DecodeState, sampling, stop_ids, max_new, *,
         stream: bool = False) -> DecodeState:
    """decode_step in a while_loop until every row is done or max_new tokens are emitted.

    stream: call the host after every step (jax.debug.callback; costs a round trip per token).
    """
    TRACES["loop"] += 1

    def cond(s):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s):
        s = _decode_step(weights, s, sampling, stop_ids, max_new)
        if stream:
            jax.debug.callback(_stream, s.step, s.last, s.lengths)
        return s

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------------------------
# Sharding: a small logical -> mesh axis table (sharding.py may later own it). Logical axes not
# listed are replicated; a listed one is replicated too when the mesh axis does not divide it
# (e.g. K = 2 kv heads on tensor = 4: every device keeps both, as in Llama 3 70B serving).

def make_mesh(data: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """A (data, tensor) mesh over the first data × tensor devices."""
    if data * tensor > jax.device_count():
        raise ValueError(f"A {data}×{tensor} mesh needs {data * tensor} devices but only "
                         f"{jax.device_count()} exist; choose data × tensor <= the device count.")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, tensor), ("data", "tensor"), axis_types=(auto, auto),
                         devices=jax.devices()[:data * tensor])


def _spec(axes, shape, mesh) -> PartitionSpec:
    """sharding.RULES without FSDP: weights split over `tensor`, replicated over `data`."""
    return sharding.spec(axes, shape, mesh, fsdp=False)


def shard(model: model_lib.Llama, mesh) -> model_lib.Llama:
    """The model with each parameter placed on `mesh` by its logical `axes` metadata."""
    graphdef, state = nnx.split(model)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, _spec(v.axes, v.shape, mesh)), state, is_leaf=is_var)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def cache_shardings(mesh, config) -> dict[str, NamedSharding]:
    """k, v [L, B_data, S, K_tensor, H]; pos, seg [B_data, S]."""
    heads = _spec(("kv_heads",), (config.n_kv_heads,), mesh)[0]  # None if tensor ∤ K
    kv = PartitionSpec(None, "data", None, heads, None)
    rows = PartitionSpec("data", None)
    return dict(k=NamedSharding(mesh, kv), v=NamedSharding(mesh, kv),
                pos=NamedSharding(mesh, rows), seg=NamedSharding(mesh, rows))


def with_dtype(model: model_lib.Llama, dtype: str) -> model_lib.Llama:
    """A copy of the model with parameters and compute in `dtype` ("float32", "bfloat16")."""
    config = model.config.replace(dtype=dtype, param_dtype=dtype)
    graphdef, _ = nnx.split(model_lib.abstract(config))
    state = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# The entry point.


def check_inputs(config, prompts, max_new_tokens, sampling, stop_ids, max_len) -> None:
    """Raises ValueError, one sentence each, before anything is compiled."""
    if not prompts:
        raise ValueError("No prompts given; pass at least one list of token ids.")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token "
                             "(e.g. the BOS id).")
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"Prompt {i} has token id {bad[0]} outside the model's vocabulary "
                             f"[0, {config.vocab_size}); check the tokenizer matches the model.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"A prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit the "
            f"cache of {max_len} slots; shorten the prompt, lower max_new_tokens or raise max_len.")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"At most {MAX_STOP_IDS} stop ids are supported, got {len(stop_ids)}.")
    sampling.validate(config.vocab_size)


def _pad_batch(prompts, p: int, multiple: int):
    """Prompts right-padded to tokens [B, P] with lengths [B]; B rounded up to `multiple`
    (the data axis) with one-token filler rows."""
    b = -(-len(prompts) // multiple) * multiple
    tokens, lengths = np.zeros((b, p), np.int32), np.ones((b,), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, :len(x)], lengths[i] = x, len(x)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def check_vocab(tokenizer_vocab_size: int, config: ModelConfig) -> None:
    """A tokenizer must have exactly the model's vocabulary (else ids mean other tokens)."""
    if tokenizer_vocab_size != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer_vocab_size} tokens but the checkpoint's vocabulary "
            f"has {config.vocab_size}; use the tokenizer the checkpoint was trained with.")


def generate(model: model_lib.Llama | Weights, prompts: Sequence[Sequence[int]],
             max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), *, seed: int = 0,
             stop_ids: Sequence[int] | None = None, max_len: int | None = None, mesh=None,
             stream: Callable | None = None, timings: dict | None = None) -> GenerateOutput:
    """Generates up to max_new_tokens after each prompt (lists of token ids, any lengths).

    model: a Llama, or its `prepare`d Weights (prepare once to skip the copy on every call).

    stop_ids: tokens that end a row (emitted, then the row stops); default the config's EOS.
    max_len: cache slots allowed (default config.max_seq_len).
    mesh: a (data, tensor) mesh from make_mesh: a Llama is placed on it with shard(); Weights
      must come from prepare(shard(model, mesh)). The batch is padded to fill the data axis.
    stream: called on the host after every step as stream(step, tokens [B], lengths [B]); the
      rows with lengths == step emitted tokens[b] at that step.
    timings: if a dict, filled with seconds: ttft (prefill and first token) and decode (the
      rest); the host then waits for the prefill before starting the loop.
    """
    if not isinstance(model, Weights):
        model = prepare(model if mesh is None else shard(model, mesh))
    config = model.config
    stop_ids = [config.eos_id] if stop_ids is None else list(stop_ids)
    max_len = max_len or config.max_seq_len
    check_inputs(config, prompts, max_new_tokens, sampling, stop_ids, max_len)
    n_rows, p, n = len(prompts), bucket(max(len(x) for x in prompts)), bucket(max_new_tokens)
    tokens, lengths = _pad_batch(prompts, p, 1 if mesh is None else mesh.shape["data"])
    if mesh is not None:
        rows = NamedSharding(mesh, PartitionSpec("data"))
        tokens, lengths = jax.device_put(tokens, rows), jax.device_put(lengths, rows)
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    args = (sampling.arrays(), jnp.asarray(stops), jnp.int32(max_new_tokens))
    t0 = time.perf_counter()
    state = start(model, tokens, lengths, jax.random.PRNGKey(seed), *args,
                  cache_len=min(p + n, max_len), n_buffer=n, mesh=mesh)
    if stream is not None or timings is not None:
        jax.block_until_ready(state)
        t1 = time.perf_counter()
    if stream is not None:
        stream(*jax.device_get((state.step, state.last, state.lengths)))
    _STREAM_TARGET[0] = stream
    try:
        state = loop(model, state, *args, stream=stream is not None)
        toks, logprobs, lens = jax.device_get((state.tokens, state.logprobs, state.lengths))
    finally:
        _STREAM_TARGET[0] = None
    if timings is not None:
        timings.update(ttft=t1 - t0, decode=time.perf_counter() - t1)
    return GenerateOutput(toks[:n_rows, :max_new_tokens], logprobs[:n_rows, :max_new_tokens],
                          lens[:n_rows])
