"""The KV cache in fixed-size pages shared by every request (paged attention, Kwon et al. 2023).

Device side: one pool k, v [L, P, Z, K, H] (P pages of Z token slots) and, per engine slot, a
row of the page table [M] naming the pages that hold its positions 0..M·Z-1 in order
(position p lives in page table[p // Z] at offset p % Z). `PagedLayerCache` is the model's
`LayerCache` with the write and the read going through that table, so model.block runs
unchanged; `forward` is decode_forward.forward over the pool.

Host side: `PagePool` hands out pages with reference counts. Page 0 is never handed out: free
slots point all their table entries at it, so their (ignored) writes land there. Full pages of
a prompt are registered under a hash of the tokens up to their end, so a request whose prompt
starts with the same pages (n samples of one prompt, a shared system prompt) takes them with a
reference instead of recomputing them (vLLM's automatic prefix caching, without keeping pages
after their last user leaves).

Axis letters: B slots, T tokens, P pages, Z page size, M pages per slot, S = M·Z key slots,
K kv heads, H head dim, L layers, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model as model_lib
from llama_jax.decode_forward import Weights

TRASH_PAGE = 0  # written by free slots and padding; never read unmasked


class PagedLayerCache(NamedTuple):
    """model.LayerCache over pages: k, v the pool [L, P, Z, K, H]; pages [B, M] the page
    table; slots [B, T] each token's position (M·Z: not written); mask [B, T, S]."""

    k: jax.Array
    v: jax.Array
    layer: Any
    pages: jax.Array
    slots: jax.Array
    mask: jax.Array

    def write(self, k, v):
        n_pages, z = self.k.shape[1], self.k.shape[2]
        b, m = self.pages.shape
        page = jnp.take_along_axis(self.pages, jnp.minimum(self.slots // z, m - 1), axis=1)
        page = jnp.where(self.slots < m * z, page, n_pages)  # out of range: dropped
        where = (self.layer, page, self.slots % z)
        ck = self.k.at[where].set(k.astype(self.k.dtype), mode="drop")
        cv = self.v.at[where].set(v.astype(self.v.dtype), mode="drop")
        shape = (b, m * z, *k.shape[2:])
        keys = ck[self.layer, self.pages].reshape(shape)  # [B, M, Z, K, H] -> [B, S, K, H]
        values = cv[self.layer, self.pages].reshape(shape)
        return keys, values, (ck, cv)


def init_pool(config, n_pages: int, page_size: int, dtype=None) -> dict[str, jax.Array]:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layers, n_pages, page_size, config.n_kv_heads, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def embed(table, tokens):
    """Embedding rows [B, T, D]; a quantized table (llama_jax/quantize.py) has `rows`."""
    return table.rows(tokens) if hasattr(table, "rows") else jnp.take(table, tokens, axis=0)


def forward(w: Weights, tokens, positions, valid, pool, pages, logits_at):
    """The model on tokens [B, T] at positions [B, T] (valid [B, T]: False is padding, not
    written) over the pool with page table pages [B, M]: (logits [B, V] f32 of token
    logits_at [B] of each row, the pool with this call's k/v written)."""
    c, ops = w.config, w.backend
    m, z = pages.shape[1], pool["k"].shape[2]
    x = embed(w.embed, tokens)
    rope = (ops.rope_table or model_lib.rope_table)(positions, model_lib.rope_frequencies(c))
    slots = jnp.where(valid, positions, m * z)
    # Key j holds position j: causal by position alone. Slots past a sequence's end hold
    # stale k/v of an earlier user of the page, masked here because j > every query position.
    mask = jnp.arange(m * z)[None, None, :] <= positions[:, :, None]
    segments = valid.astype(jnp.int32)
    kv = (pool["k"], pool["v"])
    for i, p in enumerate(w.layers):
        cache = PagedLayerCache(kv[0], kv[1], i, pages, slots, mask)
        x, kv = model_lib.block(p, x, positions, segments, rope, ops, c.norm_eps, cache)
    x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = model_lib.rms_norm(x, w.norm, c.norm_eps, ops)
    logits = model_lib.project("btd,dv->btv", x, w.head, ops, out_dtype=jnp.float32)
    return logits[:, 0], dict(k=kv[0], v=kv[1])


class PagePool:
    """Host bookkeeping of the pool's pages: free list, reference counts, prompt prefixes."""

    def __init__(self, n_pages: int, page_size: int):
        self.page_size, self.n_pages = page_size, n_pages
        self.refs = np.zeros(n_pages, np.int32)
        self.free = list(range(n_pages - 1, TRASH_PAGE, -1))  # pop() hands out low pages first
        self.by_prefix: dict[int, int] = {}  # hash of tokens[:end of page] -> page
        self.prefix_of: dict[int, int] = {}  # page -> its hash

    @property
    def n_free(self) -> int:
        return len(self.free)

    def _hashes(self, tokens, n_pages: int):
        h, z = 0, self.page_size
        for i in range(n_pages):
            h = hash((h, tuple(tokens[i * z:(i + 1) * z])))
            yield h

    def match(self, tokens) -> list[int]:
        """Registered pages that hold a prefix of tokens; always leaves >= 1 token to compute
        (its logits start the generation)."""
        found = []
        for h in self._hashes(tokens, (len(tokens) - 1) // self.page_size):
            if h not in self.by_prefix:
                break
            found.append(self.by_prefix[h])
        return found

    def take(self, shared: list[int], n_new: int) -> list[int] | None:
        """shared pages (one more reference each) + n_new fresh ones, or None if too few."""
        if n_new > len(self.free):
            return None
        pages = list(shared) + [self.free.pop() for _ in range(n_new)]
        self.refs[pages] += 1
        return pages

    def register(self, tokens, pages: list[int]) -> None:
        """Makes the full pages of a prompt whose k/v are now written findable by `match`."""
        for page, h in zip(pages, self._hashes(tokens, len(tokens) // self.page_size)):
            if h not in self.by_prefix and page not in self.prefix_of:
                self.by_prefix[h], self.prefix_of[page] = page, h

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                h = self.prefix_of.pop(page, None)
                if h is not None:
                    del self.by_prefix[h]
                self.free.append(page)
