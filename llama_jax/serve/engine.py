"""Continuous batching: requests join and leave a fixed array of slots at token granularity.

    engine = Engine(decode.prepare(model), tokenizer, slots=8)
    engine.submit(prompt_ids, Settings(max_tokens=64, temperature=0.7), on_event)
    ...
    engine.close(timeout=30)

One thread owns the device and loops: admit the oldest waiting request into a free slot (its
pages reserved for prompt + max_tokens, shared prefix pages taken from the pool), run one
prefill chunk of the request being prefilled, then one decode step over the slots that are
generating (gathered into a power-of-two row count, so one request computes one row). So a long prompt is prefilled a chunk at a time between decode steps and never
stalls the others for more than a chunk; a request leaves its slot (and its pages go back)
the step it finishes or is cancelled. Requests are prefilled one at a time in arrival order,
so the n samples of one prompt find its pages registered and prefill only their last page.

Callers get `Event`s from the engine thread through their callback: one per generated token
(text held back while it may still become a stop string or is a partial UTF-8 character), the
last one with `finish` set ("stop", "length" or "cancelled").
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import jax
import numpy as np

from llama_jax.decode_forward import Weights
from llama_jax.decode_setup import bucket
from llama_jax.serve import paged, steps
from llama_jax.serve.text import Detokenizer


class QueueFull(Exception):
    """The waiting queue is at its bound; retry later."""


class Closed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's sampling and stopping. stop_ids None: the tokenizer's (or the config's
    EOS); logprobs: alternatives returned per token (0..steps.TOP_N); seed None: random."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None
    logprobs: int = 0


@dataclasses.dataclass
class Event:
    """token: the id generated (None on a final event without one); text: new text released;
    logprob: the token's log-probability; top: [(id, logprob)] alternatives; finish: None, or
    why the request ended."""

    token: int | None
    text: str
    logprob: float = 0.0
    top: list = dataclasses.field(default_factory=list)
    finish: str | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    settings: Settings
    callback: Callable[[Event], None]
    seed: int
    detok: Detokenizer
    stop_ids: frozenset
    slot: int = -1
    pages: list = dataclasses.field(default_factory=list)
    done_prompt: int = 0  # prompt tokens whose k/v are in the pool
    generated: int = 0
    last: int = 0  # the token fed next, at position len(prompt) + generated - 1


class Engine:
    """slots: requests generating at once; page_size: token slots per page; max_len: context
    per request (default the config's); n_pages: the pool (default: every slot at max_len);
    chunk: the longest prefill chunk; max_queue: waiting requests before QueueFull."""

    def __init__(self, weights: Weights, tokenizer=None, *, slots: int = 8, page_size: int = 16,
                 max_len: int | None = None, n_pages: int | None = None, chunk: int = 256,
                 max_queue: int = 64):
        c = weights.config
        self.weights, self.tokenizer, self.max_queue = weights, tokenizer, max_queue
        self.max_len = max_len or c.max_seq_len
        self.pages_per_slot = -(-self.max_len // page_size)
        n_pages = n_pages or slots * self.pages_per_slot + 1
        if n_pages - 1 < self.pages_per_slot:
            raise ValueError(f"n_pages={n_pages} cannot hold one request of max_len="
                             f"{self.max_len} ({self.pages_per_slot} pages of {page_size} and "
                             f"the reserved page); raise n_pages or lower max_len.")
        if chunk & (chunk - 1) or chunk < 16:
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}.")
        self.chunk, self.n_slots = chunk, slots
        # Page-table widths the decode step compiles for (warmup compiles them all): powers of
        # two from 4 pages, and the whole table.
        m = self.pages_per_slot
        self.widths = sorted({min(4 << i, m) for i in range(max(1, m.bit_length()))})
        # Row counts likewise: the running requests are gathered into the smallest power of
        # two that holds them, so one request computes one row, not `slots`.
        self.row_buckets = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        self.rows_computed = 0  # decode rows run, padding included (tests read it)
        self.pool_host = paged.PagePool(n_pages, page_size)
        self.pool = paged.init_pool(c, n_pages, page_size)
        self.table = np.full((slots, self.pages_per_slot), paged.TRASH_PAGE, np.int32)
        self.slots: list[_Request | None] = [None] * slots
        self.default_stop_ids = tuple(tokenizer.stop_ids) if tokenizer else (c.eos_id,)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancel: set[int] = set()
        self._prefilling: _Request | None = None
        self._ids = itertools.count()
        self.reused_tokens = 0  # prompt tokens whose pages came from another request
        self._rng = np.random.default_rng()
        self._cv = threading.Condition()
        self._closing = self._stopped = False
        self._thread = threading.Thread(target=self._run, name="llama-jax-engine", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------------
    # The callers' side (any thread).

    def submit(self, prompt, settings: Settings, callback: Callable[[Event], None]) -> int:
        """Queues a request (checked by the caller: ids in the vocabulary, len(prompt) +
        max_tokens <= max_len); returns its id. QueueFull / Closed when it cannot."""
        if not 0 < len(prompt) < self.max_len or len(prompt) + settings.max_tokens > self.max_len:
            raise ValueError(f"A prompt of {len(prompt)} tokens plus max_tokens="
                             f"{settings.max_tokens} does not fit the context of {self.max_len}.")
        seed = settings.seed if settings.seed is not None else int(self._rng.integers(2**31))
        stop_ids = settings.stop_ids if settings.stop_ids is not None else self.default_stop_ids
        with self._cv:
            if self._closing:
                raise Closed("The server is shutting down.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound).")
            req = _Request(next(self._ids), list(prompt), settings, callback, seed % 2**31,
                           Detokenizer(self.tokenizer, settings.stop), frozenset(stop_ids))
            self._waiting.append(req)
            self._cv.notify()
        return req.id

    def cancel(self, request_id: int) -> None:
        """Ends a request (waiting or running) at the next step; its slot and pages are freed."""
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            return dict(slots=self.n_slots, running=sum(r is not None for r in self.slots),
                        waiting=len(self._waiting), pages=self.pool_host.n_pages - 1,
                        free_pages=self.pool_host.n_free, page_size=self.pool_host.page_size,
                        max_len=self.max_len, reused_tokens=self.reused_tokens)

    def warmup(self) -> None:
        """Compiles the decode step for every row count x page-table width and the prefill
        step for every chunk bucket (16 .. chunk tokens) x width it can meet, now rather than
        on the first requests. Call it before submitting requests."""
        for b, width in itertools.product(self.row_buckets, self.widths):
            zeros = np.zeros((b,), np.int32)  # the engine thread is idle: no request yet
            self.pool, _ = steps.decode_step(
                self.weights, self.pool, zeros, zeros,
                np.full((b, width), paged.TRASH_PAGE, np.int32), self._sampling([None] * b))
        z = self.pool_host.page_size
        for c in (16 << i for i in range(self.chunk.bit_length())):
            if c > min(self.chunk, bucket(self.max_len - 1)):
                break
            shortest = 1 if c == 16 else c // 2 + 1  # the fewest tokens padded to c
            for width in self.widths:
                if width == self.widths[-1] or width * z >= shortest:
                    self.pool, _ = steps.prefill_step(
                        self.weights, self.pool, np.zeros((1, c), np.int32), np.int32(0),
                        np.int32(1), np.full((1, width), paged.TRASH_PAGE, np.int32),
                        self._sampling([None]))

    def close(self, timeout: float = 30.0) -> None:
        """Takes no new requests, lets running and waiting ones finish for up to `timeout`
        seconds, cancels the rest and stops the thread."""
        with self._cv:
            self._closing = True
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._busy():
            time.sleep(0.02)
        with self._cv:
            self._cancel.update(r.id for r in [*self._waiting, *self.slots] if r is not None)
            self._stopped = True
            self._cv.notify()
        self._thread.join()

    def _busy(self) -> bool:
        with self._cv:
            return bool(self._waiting) or any(r is not None for r in self.slots)

    # --------------------------------------------------------------------------------------
    # The engine thread.

    def _run(self):
        while True:
            with self._cv:
                self._cancel_marked()
                while not (self._stopped or self._waiting or self._prefilling
                           or self._decoding()):
                    self._cv.wait()
                    self._cancel_marked()
                if self._stopped and not self._busy_locked():
                    return
            try:
                self._step()
            except Exception:  # a bug: fail every request rather than hang their clients
                logging.exception("serving engine step failed")
                with self._cv:
                    self._cancel.update(r.id for r in [*self._waiting, *self.slots] if r)
                    self._cancel_marked()

    def _busy_locked(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self.slots)

    def _decoding(self) -> list[_Request]:
        return [r for r in self.slots if r is not None and r is not self._prefilling]

    def _cancel_marked(self):
        if not self._cancel:
            return
        for r in [r for r in self._waiting if r.id in self._cancel]:
            self._waiting.remove(r)
            self._notify(r, Event(None, "", finish="cancelled"))
        for r in self.slots:
            if r is not None and r.id in self._cancel:
                self._finish(r, "cancelled")
        self._cancel.clear()

    def _step(self):
        if self._prefilling is None:
            with self._cv:
                self._admit()
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        if self._decoding():
            self._decode()

    def _admit(self):
        """The oldest waiting request into a free slot, if its pages are available."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        if not free or not self._waiting:
            return
        r, z = self._waiting[0], self.pool_host.page_size
        shared = self.pool_host.match(r.prompt)
        need = -(-(len(r.prompt) + r.settings.max_tokens) // z)
        pages = self.pool_host.take(shared, need - len(shared))
        if pages is None:
            return  # waits for running requests to release pages
        self._waiting.popleft()
        r.slot, r.pages, r.done_prompt = free[0], pages, len(shared) * z
        self.reused_tokens += r.done_prompt
        self.slots[r.slot] = r
        self.table[r.slot, :] = paged.TRASH_PAGE
        self.table[r.slot, :len(pages)] = pages
        self._prefilling = r

    def _sampling(self, rows: list[_Request | None]) -> dict:
        def col(f, dtype):
            return np.array([f(r) if r is not None else 0 for r in rows], dtype)
        return dict(temperature=col(lambda r: r.settings.temperature, np.float32),
                    top_p=col(lambda r: r.settings.top_p, np.float32),
                    min_p=col(lambda r: r.settings.min_p, np.float32),
                    top_k=col(lambda r: r.settings.top_k, np.int32),
                    seed=col(lambda r: r.seed, np.int32), step=col(lambda r: r.generated,
                                                                   np.int32))

    def _prefill_chunk(self, r: _Request):
        n = min(self.chunk, len(r.prompt) - r.done_prompt)
        tokens = np.zeros((1, bucket(n)), np.int32)
        tokens[0, :n] = r.prompt[r.done_prompt:r.done_prompt + n]
        # As in decode: attention over the pages written so far (a width bucket), not all.
        pages = -(-(r.done_prompt + n) // self.pool_host.page_size)
        width = next(w for w in self.widths if w >= pages)
        self.pool, out = steps.prefill_step(
            self.weights, self.pool, tokens, np.int32(r.done_prompt), np.int32(n),
            self.table[r.slot:r.slot + 1, :width], self._sampling([r]))
        r.done_prompt += n
        if r.done_prompt < len(r.prompt):
            return
        self._prefilling = None
        out = jax.device_get(out)
        with self._cv:
            self.pool_host.register(r.prompt, r.pages)
            if r.id not in self._cancel:
                self._accept(r, {k: v[0] for k, v in out.items()})

    def _decode(self):
        running = self._decoding()
        n = next(b for b in self.row_buckets if b >= len(running))
        rows = running + [None] * (n - len(running))  # padding rows write the trash page
        tokens = np.array([r.last if r else 0 for r in rows], np.int32)
        positions = np.array([len(r.prompt) + r.generated - 1 if r else 0 for r in rows],
                             np.int32)
        # Attention reads the first `width` pages of every row: the smallest bucket that
        # holds the longest request running, not the whole context.
        width = next(w for w in self.widths if w >= max(len(r.pages) for r in running))
        table = np.full((n, width), paged.TRASH_PAGE, np.int32)
        table[:len(running)] = self.table[[r.slot for r in running], :width]
        self.pool, out = steps.decode_step(self.weights, self.pool, tokens, positions, table,
                                           self._sampling(rows))
        self.rows_computed += n
        out = jax.device_get(out)
        with self._cv:
            for i, r in enumerate(running):
                if self.slots[r.slot] is r and r.id not in self._cancel:
                    self._accept(r, {k: v[i] for k, v in out.items()})

    def _accept(self, r: _Request, out: dict):
        """Records one generated token: an event, and the end of the request if it stops."""
        token, r.generated, r.last = int(out["token"]), r.generated + 1, int(out["token"])
        n_top = r.settings.logprobs
        top = [(int(i), float(p)) for i, p in zip(out["top_ids"][:n_top],
                                                  out["top_logprobs"][:n_top])]
        logprob = float(out["logprob"])
        if token in r.stop_ids:
            # The stop token ends the text but is not part of it (as the OpenAI API reports).
            self._notify(r, Event(None, r.detok.flush(), finish="stop"))
            self._release(r)
            return
        text, hit_stop = r.detok.add(token)
        finish = "stop" if hit_stop else ("length" if r.generated >= r.settings.max_tokens
                                          else None)
        if finish is not None:
            text += r.detok.flush()
        self._notify(r, Event(token, text, logprob, top, finish=finish))
        if finish is not None:
            self._release(r)

    def _finish(self, r: _Request, reason: str):
        if self._prefilling is r:
            self._prefilling = None
        self._notify(r, Event(None, "", finish=reason))
        self._release(r)

    def _release(self, r: _Request):
        if r.slot >= 0 and self.slots[r.slot] is r:
            self.slots[r.slot] = None
            self.table[r.slot] = paged.TRASH_PAGE
            self.pool_host.release(r.pages)
            r.pages = []

    @staticmethod
    def _notify(r: _Request, event: Event):
        try:
            r.callback(event)
        except Exception:  # a caller's bug must not stop everyone else's requests
            logging.exception("serving callback of request %d failed", r.id)
