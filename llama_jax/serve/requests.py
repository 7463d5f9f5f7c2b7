"""The OpenAI API's request bodies, checked: prompts as token ids and the engine's Settings.

Every mistake is an `ApiError` (HTTP 400) with one sentence naming the field, raised before the
request reaches the engine. Fields follow the OpenAI API (completions: prompt, max_tokens
default 16, logprobs 0..5; chat: messages, max_tokens default the rest of the context,
logprobs + top_logprobs) plus vLLM's top_k, min_p and stop_token_ids.
"""

from __future__ import annotations

import json
import numbers

from llama_jax.serve.engine import Settings
from llama_jax.serve.steps import TOP_N

MAX_N = 16  # choices per request
MAX_STOP = 8  # stop strings per request


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"The request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e});"
                       f" send a JSON object.", "body") from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", "body")
    return body


def _num(body, name, default, lo=None, hi=None, *, integer=False, lo_open=False):
    """body[name] (default when absent or null), checked to be a number in range."""
    x = body.get(name)
    if x is None:
        return default
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(x, bool) or not isinstance(x, kind):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a number'}, got {x!r}.",
                       name)
    low_bad = lo is not None and (x <= lo if lo_open else x < lo)
    if low_bad or (hi is not None and x > hi):
        span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi or 'inf'}]"
        raise ApiError(f"{name} must be in {span}, got {x}.", name)
    return x


def check_model(body, served: str) -> None:
    name = body.get("model")
    if name is None:
        raise ApiError(f"model is required; this server serves {served!r}.", "model")
    if name != served:
        raise ApiError(f"Unknown model {name!r}; this server serves {served!r}.", "model")


def completion_prompts(body, tokenizer, vocab: int) -> list[list[int]]:
    """prompt: a string, a list of token ids, or a list of either."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and _is_ids(p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ApiError("prompt must be a string, a list of token ids, or a non-empty list of "
                       "those.", "prompt")
    out = []
    for x in p:
        if isinstance(x, str):
            if tokenizer is None:
                raise ApiError("This server has no tokenizer; send prompt as token ids.",
                               "prompt")
            if not x:
                raise ApiError("prompt is empty; send some text or token ids.", "prompt")
            out.append(tokenizer.encode(x, bos=True, eos=False))
        elif isinstance(x, list) and x and _is_ids(x):
            bad = [t for t in x if not 0 <= t < vocab]
            if bad:
                raise ApiError(f"prompt has token id {bad[0]} outside the vocabulary [0, "
                               f"{vocab}).", "prompt")
            out.append(list(x))
        else:
            raise ApiError("prompt must be a string, a list of token ids, or a non-empty list "
                           "of those.", "prompt")
    return out


def _is_ids(x) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def chat_prompt(body, tokenizer) -> list[int]:
    """messages: [{role: system|user|assistant, content: str}], in the tokenizer's chat format."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty list of {role, content} objects.",
                       "messages")
    for i, m in enumerate(msgs):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise ApiError(f"messages[{i}] must be an object with role system, user or "
                           f"assistant and a string content.", "messages")
    if tokenizer is None:
        raise ApiError("This server has no tokenizer, so no chat format; use /v1/completions "
                       "with token ids.", "messages")
    try:
        return tokenizer.encode_dialog([{"role": m["role"], "content": m["content"]}
                                        for m in msgs])
    except ValueError as e:
        raise ApiError(str(e), "messages") from None


def settings(body, prompt_lens: list[int], max_len: int, *, chat: bool) -> Settings:
    """The engine settings of a request whose prompts have these lengths."""
    longest = max(prompt_lens)
    field = "messages" if chat else "prompt"
    if longest >= max_len:
        raise ApiError(f"The {field} has {longest} tokens, more than the context of {max_len} "
                       f"leaves room for; shorten it.", field)
    max_tokens = _num(body, "max_tokens", None, 1, integer=True)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _num(body, "max_completion_tokens", None, 1, integer=True)
    if max_tokens is None:
        max_tokens = max_len - longest if chat else min(16, max_len - longest)
    if longest + max_tokens > max_len:
        raise ApiError(f"max_tokens={max_tokens} plus the {field}'s {longest} tokens exceeds "
                       f"the context of {max_len}; lower max_tokens to at most "
                       f"{max_len - longest}.", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) for s in stop):
        raise ApiError(f"stop must be a string or a list of at most {MAX_STOP} strings.", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not _is_ids(stop_ids)):
        raise ApiError("stop_token_ids must be a list of token ids.", "stop_token_ids")
    if chat:
        logprobs = _num(body, "top_logprobs", 0, 0, TOP_N, integer=True)
        logprobs = max(logprobs, 1) if body.get("logprobs") else 0
    else:
        logprobs = _num(body, "logprobs", 0, 0, TOP_N, integer=True)
    top_k = _num(body, "top_k", 0, -1, integer=True)
    return Settings(
        max_tokens=max_tokens, temperature=float(_num(body, "temperature", 1.0, 0)),
        top_p=float(_num(body, "top_p", 1.0, 0, 1, lo_open=True)), top_k=max(top_k, 0),
        min_p=float(_num(body, "min_p", 0.0, 0, 1)),
        seed=_num(body, "seed", None, integer=True), stop=tuple(stop),
        stop_ids=None if stop_ids is None else tuple(stop_ids), logprobs=logprobs)


def n_choices(body) -> int:
    return _num(body, "n", 1, 1, MAX_N, integer=True)


def stream_flag(body) -> bool:
    s = body.get("stream", False)
    if not isinstance(s, bool):
        raise ApiError(f"stream must be true or false, got {s!r}.", "stream")
    return s
