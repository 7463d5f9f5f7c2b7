"""The engine's two compiled steps and its per-row sampler.

`decode_step` feeds one token to each of B rows: the engine gathers its generating requests
into the smallest power of two B that holds them (padding rows write the trash page), so
requests join and leave by changing values, not shapes, and one running request computes one
row, not every slot (inter-token p50 94 -> 24 ms at C = 1, bench shape, BENCHMARKS.md). The page
table passed is cut to a power-of-two width that holds the longest running request, because
attention over unused pages cost 3.7x at 32 slots of 1,024 tokens (128 vs 1,024 keys, bench
shape). `prefill_step` runs a chunk of one prompt, padded to a power-of-two bucket, over the
width that holds its pages so far. One compile per shape, all at start-up. Both write into the
page pool in place (donated) and sample with each row's own settings.

Sampling per row: sampling.filter_logits with [B, 1] settings (temperature, top-k, top-p,
min-p), a key per row, fold_in(PRNGKey(seed), step) where step counts the request's tokens, so
a seeded request samples the same tokens whichever slot and neighbours it gets. Temperature 0
rows take the argmax; the sort is skipped when no row samples.

Axis letters: B slots, C chunk bucket, M pages per slot, V vocab, A alternatives (TOP_N).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax import sampling as sampling_lib
from llama_jax.serve import paged

TOP_N = 5  # alternatives returned per token (the OpenAI API's logprobs maximum)


def pick(logits, s: dict):
    """logits [B, V] f32; s: temperature, top_p, min_p [B] f32, top_k, seed, step [B] int32.
    Returns dict(token [B], logprob [B], top_ids [B, A], top_logprobs [B, A]); log-probs are
    the model's at temperature 1, before any filter (as sampling.sample)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = s["temperature"] > 0
    col = {k: s[k][:, None] for k in ("temperature", "top_k", "top_p", "min_p")}

    def draw(_):
        # The filters sort the vocabulary: only when some row asks for one.
        filtered = (s["top_k"] > 0) | (s["top_p"] < 1) | (s["min_p"] > 0)
        x = jax.lax.cond(jnp.any(filtered & sampled),
                         lambda: sampling_lib.filter_logits(logits, **col),
                         lambda: logits / jnp.maximum(col["temperature"], 1e-6))
        keys = jax.vmap(lambda seed, t: jax.random.fold_in(jax.random.PRNGKey(seed), t))(
            s["seed"], s["step"])
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, None)
    token = jnp.where(sampled, drawn, greedy)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logp, TOP_N)
    logprob = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return dict(token=token, logprob=logprob, top_ids=top_ids.astype(jnp.int32),
                top_logprobs=top_logprobs)


@functools.partial(jax.jit, donate_argnames=("pool",))
def decode_step(weights, pool, tokens, positions, pages, sampling):
    """tokens, positions [B] int32 (padding rows: anything, their pages all TRASH_PAGE), pages
    [B, M]: (pool, pick's dict)."""
    b = tokens.shape[0]
    logits, pool = paged.forward(weights, tokens[:, None], positions[:, None],
                                 jnp.ones((b, 1), bool), pool, pages, jnp.zeros((b,), jnp.int32))
    return pool, pick(logits, sampling)


@functools.partial(jax.jit, donate_argnames=("pool",))
def prefill_step(weights, pool, tokens, start, length, pages, sampling):
    """One chunk of one prompt: tokens [1, C] (the first `length` real) at positions start..;
    pages [1, M]: (pool, pick's dict for the chunk's last real token)."""
    c = tokens.shape[1]
    offsets = jnp.arange(c, dtype=jnp.int32)[None, :]
    logits, pool = paged.forward(weights, tokens, start + offsets, offsets < length, pool, pages,
                                 jnp.reshape(length - 1, (1,)))
    return pool, pick(logits, sampling)
