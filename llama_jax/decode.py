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

Determinism: step t samples with `fold_in(PRNGKey(seed), t)`, so a seed fixes the output.

The pieces live beside this file: decode_forward.py (`Weights`, `prepare`, `forward`: the
model's math over the cache, laid out for XLA:CPU's matrix-vector speed) and decode_setup.py
(dtype, mesh placement, padding, input checks). Their public names are re-exported here.

Axis letters: B batch, P prompt bucket, N new-token buffer, S cache slots, V vocab,
K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model as model_lib
from llama_jax import sampling as sampling_lib
from llama_jax.decode_forward import Weights, forward, prepare
from llama_jax.decode_setup import (MAX_STOP_IDS, bucket, cache_shardings, check_inputs,
                                    check_vocab, make_mesh, pad_batch, shard, stop_array,
                                    with_dtype)
from llama_jax.sampling import SamplingParams

__all__ = ["Weights", "prepare", "forward", "MAX_STOP_IDS", "bucket", "cache_shardings",
           "check_inputs", "check_vocab", "make_mesh", "shard", "with_dtype", "DecodeState",
           "GenerateOutput", "prefill", "decode_step", "start", "loop", "generate"]

# The current generate() call's stream callback. The compiled loop calls `_stream` (one static
# function, so a new callback does not recompile), which forwards here.
_STREAM_TARGET: list[Callable | None] = [None]


def _stream(step, tokens, lengths):
    if _STREAM_TARGET[0] is not None:
        _STREAM_TARGET[0](step, tokens, lengths)


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


def logits(weights: Weights, tokens, segments=None, cache_dtype=None):
    """Teacher-forced logits [B, T, V] (f32) at every position of tokens [B, T] (segments
    [B, T], 0 = padding; default all real), through the decode forward over a cache of T slots
    (cache_dtype: default the config's). For scoring and comparing weight forms."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = jnp.ones_like(tokens) if segments is None else segments
    cache = model_lib.init_cache(weights.config, b, t, cache_dtype)
    return forward(weights, tokens, positions, segments, cache)[0]


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
    def cond(s):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s):
        s = _decode_step(weights, s, sampling, stop_ids, max_new)
        if stream:
            jax.debug.callback(_stream, s.step, s.last, s.lengths)
        return s

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------------------------
# The entry point.


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
    tokens, lengths = pad_batch(prompts, p, 1 if mesh is None else mesh.shape["data"])
    if mesh is not None:
        rows = NamedSharding(mesh, PartitionSpec("data"))
        tokens, lengths = jax.device_put(tokens, rows), jax.device_put(lengths, rows)
    args = (sampling.arrays(), jnp.asarray(stop_array(stop_ids)), jnp.int32(max_new_tokens))
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


class TextStream:
    """decode.generate's `stream` callback: prints row 0's text as it grows (a partial UTF-8
    character is held back) and keeps the ids."""

    def __init__(self, tok, stop_ids=(), out=None):
        self.tok, self.stop_ids, self.ids, self.shown = tok, set(stop_ids), [], ""
        self.out = out or sys.stdout

    def __call__(self, step, tokens, lengths):
        if lengths[0] == step and int(tokens[0]) not in self.stop_ids:
            self.ids.append(int(tokens[0]))
            text = self.tok.decode(self.ids).rstrip("\ufffd")
            if text.startswith(self.shown):
                self.out.write(text[len(self.shown):])
                self.out.flush()
                self.shown = text
