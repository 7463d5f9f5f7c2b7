"""Rejection sampling (Llama 3 paper §4.2.2): K responses per prompt from the policy, scored by
the reward model, the best kept as SFT data. Best-of-N is also test-time compute.

    prompts = rejection.read_prompts("prompts.jsonl")           # [(line, messages)]
    for result in rejection.best_of_n(policy, rm, tokenizer, prompts, n=8):
        result.best  # {"messages": prompt + [best response], "score": its reward}

Prompts are JSONL, one conversation per line ending with a user turn: {"messages": [...]} or
TRL's {"prompt": [...]} (a preference file's prompts serve as they are). A bad line is logged
with its file and line and skipped; a file with no good prompt is one ValueError.

Sampling runs the jitted decode loop (llama_jax.decode.generate) on batches of whole prompts
× K rows, each row its own sample (temperature / top-p as in decoding). A response is the
decoded text of the tokens before the first stop token; it is scored as the reward model was
trained: the conversation prompt + response in the chat format (chat_data.encode) up to and
including the response's end-of-turn token. A response that hit max_new_tokens without a stop
token is unfinished: it is not a candidate unless `keep_unfinished` (else a prompt whose K
samples are all unfinished yields nothing, and is counted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Sequence

import numpy as np

from llama_jax import chat_data, decode, reward
from llama_jax.sampling import SamplingParams


def prompt_problem(obj) -> str | None:
    """Why a JSONL prompt object is unusable, or None: its messages followed by an assistant
    reply must be a good SFT conversation (chat_data.sft_problem)."""
    if not isinstance(obj, dict) or not ({"messages", "prompt"} & set(obj)):
        return "not an object with \"messages\" or \"prompt\""
    messages = obj.get("messages", obj.get("prompt"))
    if not isinstance(messages, list) or not messages:
        return "no messages"
    why = chat_data.sft_problem({"messages": conversation(messages, "")})
    return why and f"{why} once a reply is added; a prompt ends with a user turn"


def read_prompts(path: str) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of every good prompt in the JSONL file `path`."""
    good, bad, first = [], 0, None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                why = prompt_problem(obj)
            except json.JSONDecodeError as e:
                obj, why = None, f"not valid JSON ({e.msg})"
            if why:
                bad, first = bad + 1, first or f"{path}:{n}: {why}"
                logging.warning("%s:%d: %s; skipped.", path, n, why)
                continue
            good.append((n, obj.get("messages", obj.get("prompt"))))
    if not good:
        raise ValueError(f"{path} has no usable prompt ({bad} bad; first: {first}); each line "
                         f"is {{\"messages\": [..., {{\"role\": \"user\", ...}}]}}.")
    return good


@dataclasses.dataclass(frozen=True)
class Result:
    """One prompt's K samples: texts, rewards (NaN: unfinished, not a candidate) and the
    best as an SFT example, or best None when no sample is a candidate."""

    line: int
    messages: list[dict]
    texts: list[str]
    scores: list[float]
    best: dict | None


def best_of_n(policy, reward_model, tokenizer, prompts: Sequence[tuple[int, list[dict]]], *,
              n: int, sampling: SamplingParams = SamplingParams(0.8, top_p=0.95),
              max_new_tokens: int = 256, batch_rows: int = 64, seed: int = 0,
              keep_unfinished: bool = False) -> Iterator[Result]:
    """Results in prompt order; `batch_rows` bounds the rows per decode call (at least K)."""
    per_call = max(1, batch_rows // n)
    for c, start in enumerate(range(0, len(prompts), per_call)):
        chunk = prompts[start:start + per_call]
        rows = [tokenizer.encode_dialog(messages) for _, messages in chunk for _ in range(n)]
        out = decode.generate(policy, rows, max_new_tokens, sampling, seed=seed + c,
                              stop_ids=tokenizer.stop_ids)
        for i, (line, messages) in enumerate(chunk):
            samples = [_response(out.ids(i * n + j), tokenizer, max_new_tokens)
                       for j in range(n)]
            yield _judge(line, messages, samples, reward_model, tokenizer, keep_unfinished)


def _response(ids: list[int], tokenizer, max_new_tokens: int) -> tuple[str, bool]:
    """(text before the first stop token, finished?) of a generated row."""
    stops = set(tokenizer.stop_ids)
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    if cut is None:
        return tokenizer.decode(ids), len(ids) < max_new_tokens
    return tokenizer.decode(ids[:cut]), True


def _judge(line, messages, samples, reward_model, tokenizer, keep_unfinished) -> Result:
    """Scores the candidate samples of one prompt and picks the best."""
    texts = [text for text, _ in samples]
    rows = [chat_data.encode(tokenizer, conversation(messages, text)).tokens for text in texts]
    scores = reward.score(reward_model, rows, pad_id=tokenizer.pad_id).astype(np.float64)
    scores[[not (done or keep_unfinished) for _, done in samples]] = np.nan
    best = None
    if not np.all(np.isnan(scores)):
        k = int(np.nanargmax(scores))
        best = {"messages": conversation(messages, texts[k]), "score": float(scores[k])}
    return Result(line, messages, texts, scores.tolist(), best)


def conversation(messages: list[dict], response: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": response}]
