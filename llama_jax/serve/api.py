"""The OpenAI-compatible HTTP API over an Engine, as a FastAPI app (experiments/serve.py runs it
under uvicorn).

    POST /v1/completions        prompt as text or token ids; n, stream, logprobs, stop, ...
    POST /v1/chat/completions   messages in the tokenizer's chat format
    GET  /v1/models, /health    the served model; the engine's slots, queue and pages

Each choice is one engine request; the engine thread hands its events to the request's asyncio
queue (call_soon_threadsafe). A full engine queue answers 429 with Retry-After; a client that
goes away (a closed stream, a dropped connection) has its requests cancelled, which frees
their slots and pages at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llama_jax.serve import requests as req_lib
from llama_jax.serve.engine import Closed, Engine, Event, QueueFull
from llama_jax.serve.requests import ApiError

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, tokenizer, model_name: str, *,
               drain_timeout: float = 1.0) -> FastAPI:
    """The app; at shutdown the engine gets drain_timeout seconds more, then is closed."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped taking connections and waited for open ones (up to its
        # timeout_graceful_shutdown; the requests of connections it cut are cancelled), so
        # what is left here is at most a step or two.
        await asyncio.to_thread(engine.close, drain_timeout)

    app = FastAPI(title="llama-jax", lifespan=lifespan)
    vocab = engine.weights.config.vocab_size

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama-jax",
                                            "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = req_lib.parse_json(await request.body())
        req_lib.check_model(body, model_name)
        prompts = req_lib.completion_prompts(body, tokenizer, vocab)
        return await _serve(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = req_lib.parse_json(await request.body())
        req_lib.check_model(body, model_name)
        return await _serve(request, body, [req_lib.chat_prompt(body, tokenizer)], chat=True)

    async def _serve(request, body, prompts, *, chat: bool):
        settings = req_lib.settings(body, [len(p) for p in prompts], engine.max_len, chat=chat)
        n, stream = req_lib.n_choices(body), req_lib.stream_flag(body)
        run = _Run(engine, [p for p in prompts for _ in range(n)], settings)
        fmt = _Format(tokenizer, model_name, chat, settings.logprobs > 0)
        if stream:
            return StreamingResponse(_sse(run, fmt), media_type="text/event-stream")
        try:
            results = await run.collect(request)
        finally:
            run.cancel()
        if results is None:  # the client went away; nobody reads an answer
            return JSONResponse({}, status_code=499)
        return fmt.whole(results, [len(p) for p in prompts])

    return app


class _Run:
    """The engine requests of one HTTP request (prompts × n), their events on one queue."""

    def __init__(self, engine: Engine, prompts, settings):
        self.engine, self.prompts, self.ids, self.open = engine, prompts, [], set()
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            for i, p in enumerate(prompts):
                s = settings
                if s.seed is not None and i:  # the n samples differ, reproducibly
                    s = type(s)(**{**s.__dict__, "seed": s.seed + i})
                self.ids.append(engine.submit(p, s, self._callback(loop, i)))
                self.open.add(i)
        except QueueFull as e:
            self.cancel()
            raise ApiError(f"The server is busy ({e}); retry after {RETRY_AFTER_S} s.",
                           None, 429, "rate_limit_error") from None
        except Closed as e:
            self.cancel()
            raise ApiError(str(e), None, 503, "server_error") from None

    def _callback(self, loop, i):
        return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

    async def events(self):
        """(choice index, Event) until every choice has finished."""
        while self.open:
            i, event = await self.queue.get()
            if event.finish is not None:
                self.open.discard(i)
            yield i, event

    async def collect(self, request: Request):
        """Every choice's events, or None if the client disconnects first."""
        results = [[] for _ in self.prompts]
        while self.open:
            try:
                i, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            results[i].append(event)
            if event.finish is not None:
                self.open.discard(i)
        return results

    def cancel(self):
        for i in list(self.open):
            self.engine.cancel(self.ids[i])
        self.open.clear()


async def _sse(run: _Run, fmt: _Format):
    """Server-sent events: one chunk per event with text (or logprobs), then [DONE]. A
    disconnect cancels this generator, and with it the engine requests."""
    try:
        if fmt.chat:
            for i in range(len(run.prompts)):
                yield _data(fmt.chunk(i, None, role=True))
        async for i, event in run.events():
            if event.text or event.finish or (fmt.logprobs and event.token is not None):
                yield _data(fmt.chunk(i, event))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()


def _data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Format:
    """Response bodies in the OpenAI API's shapes."""

    def __init__(self, tokenizer, model_name, chat: bool, logprobs: bool):
        self.tok, self.model, self.chat, self.logprobs = tokenizer, model_name, chat, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _piece(self, token: int) -> str:
        return self.tok.decode([token]) if self.tok is not None else str(token)

    def _logprobs(self, events: list[Event]):
        events = [e for e in events if e.token is not None]
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [{"token": self._piece(e.token), "logprob": e.logprob,
                                 "bytes": None, "top_logprobs": [
                                     {"token": self._piece(t), "logprob": p, "bytes": None}
                                     for t, p in e.top]} for e in events]}
        return {"tokens": [self._piece(e.token) for e in events],
                "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self._piece(t): p for t, p in e.top} for e in events]}

    def _choice(self, i, text, events, finish):
        c = {"index": i, "finish_reason": finish, "logprobs": self._logprobs(events)}
        if self.chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        return c

    def whole(self, results: list[list[Event]], prompt_lens: list[int]) -> dict:
        choices = [self._choice(i, "".join(e.text for e in ev), ev, ev[-1].finish)
                   for i, ev in enumerate(results)]
        completion = sum(e.token is not None for ev in results for e in ev)
        prompt = sum(prompt_lens)  # each prompt once, however many samples it has
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    def chunk(self, i: int, event: Event | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": event.text} if event.text else {})
            c = {"index": i, "delta": delta, "logprobs": None if role else self._logprobs(
                [event]), "finish_reason": None if role else event.finish}
            return {**self._head("chat.completion.chunk"), "choices": [c]}
        c = self._choice(i, event.text, [event], event.finish)
        return {**self._head("text_completion"), "choices": [c]}
