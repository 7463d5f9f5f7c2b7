"""Conversations and preference pairs (JSONL) → packed token rows with label masks (Grain).

Formats, one JSON object per line:

    SFT:         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    preference:  {"prompt": [messages ending with a user turn],          (TRL's conversational
                  "chosen": [{"role": "assistant", "content": str}],      preference format; DPO
                  "rejected": [{"role": "assistant", "content": str}]}    and the reward model)

Roles: an optional leading system message, then user and assistant turns alternating from a
user turn; an SFT conversation ends with an assistant turn. Anything else (invalid JSON, an
unknown role, roles out of order, no assistant turn, chosen identical to rejected) is bad:
`scan` logs one line per bad example (file:line and why) before the run builds anything, and
the pipeline skips it; a file with no good example is one ValueError.

Tokens are the model's own chat format (`encode`): Llama 3's `<|start_header_id|>role
<|end_header_id|>\\n\\n content <|eot_id|>` after `<|begin_of_text|>`, or Llama 2's
`<s>[INST] user [/INST] answer </s>` (a system message folded into the first user turn).
Per token, `labels` marks what SFT trains on: every assistant message's content tokens and its
closing end-of-turn token (`<|eot_id|>` / `</s>`), never headers, system or user turns, BOS or
padding. `response` marks the content tokens of the last message alone (no header, no
end-of-turn): the tokens whose log-probabilities DPO sums (Llama 3 paper §4.1.4).

Packing never splits an example: an SFT row takes whole conversations while they fit (grain's
first-fit packer, one bin, in order), and a conversation longer than `seq_len` tokens is cut
to `seq_len` (counted in the log). A preference batch holds `global_batch` pairs; its 2·P
sequences (each at most `seq_len` tokens) are packed first-fit, in order, into 2·P rows, so
chosen and rejected each have a row of their own or share one with other sequences, and the
rows no sequence reached stay padding.

Both go through the pretraining corpus (llama_jax.corpus: TFDS array_record, one record per
JSONL line) and Grain, so the iterator state is a few integers and resume is exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import numpy as np

from llama_jax import corpus

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------
# Checks: why an example is bad, or None.


def _messages_problem(messages, *, last: str) -> str | None:
    """Why `messages` is not a conversation ending with a `last` turn, or None."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            return "a message is not {\"role\": str, \"content\": str}"
        if m["role"] not in ROLES:
            return f"unknown role {m['role']!r} (known: {', '.join(ROLES)})"
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * len(turns)
    if turns != expected[:len(turns)]:
        return f"roles out of order ({' '.join(roles)}); expected [system] user assistant ..."
    if last == "assistant" and "assistant" not in turns:
        return "no assistant turn (nothing to learn)"
    if turns and turns[-1] != last:
        return f"ends with a {turns[-1]} turn, not an {last} turn"
    return None


def sft_problem(obj: Any) -> str | None:
    """Why an SFT example is bad, or None."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return "not an object with \"messages\""
    return _messages_problem(obj["messages"], last="assistant")


def pair_problem(obj: Any) -> str | None:
    """Why a preference pair is bad, or None."""
    if not isinstance(obj, dict) or not {"prompt", "chosen", "rejected"} <= set(obj):
        return "not an object with \"prompt\", \"chosen\" and \"rejected\""
    why = _messages_problem(obj["prompt"], last="user")
    for side in ("chosen", "rejected"):
        response = obj[side]
        if why is None and (not isinstance(response, list) or len(response) != 1):
            why = f"{side} is not a list of one assistant message"
        why = why or _messages_problem(obj["prompt"] + response, last="assistant")
    if why is None and obj["chosen"][0]["content"] == obj["rejected"][0]["content"]:
        why = "chosen and rejected are identical"
    return why


PROBLEM = {"sft": sft_problem, "preference": pair_problem}


def parse(line: str | bytes, kind: str) -> tuple[Any, str | None]:
    """(example, None) or (None, why it is bad) of one JSONL line of `kind` sft/preference."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
    why = PROBLEM[kind](obj)
    return (None, why) if why else (obj, None)


def scan(files: str, kind: str) -> int:
    """Reads every line of the JSONL files of glob `files` once: logs one warning per bad
    example (file:line: why), returns the count of good ones; ValueError if there is none.
    Runs before anything is built or compiled."""
    paths = corpus.corpus_files(files) if files else []
    if not paths:
        raise ValueError(f"post-training needs data.files, a glob of JSONL {kind} files; got "
                         f"{files!r}.")
    good, bad, first = 0, 0, None
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                _, why = parse(line, kind)
                if why is None:
                    good += 1
                    continue
                bad += 1
                first = first or f"{path}:{n}: {why}"
                logging.warning("%s:%d: %s; skipped.", path, n, why)
    if not good:
        raise ValueError(f"every one of the {bad} examples in {files} is bad (first: {first}); "
                         f"fix the data (format: README, Post-training).")
    if bad:
        logging.warning("Skipped %d bad %s examples of %d in %s.", bad, kind, good + bad, files)
    return good


# ----------------------------------------------------------------------------------------------
# Encoding in the model's chat format.


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sequence: tokens [n] int32, labels [n] (SFT targets) and response [n] (the last
    message's content tokens), both int32 0/1."""
    tokens: np.ndarray
    labels: np.ndarray
    response: np.ndarray

    def cut(self, n: int) -> Encoded:
        return Encoded(self.tokens[:n], self.labels[:n], self.response[:n])


def encode(tokenizer, messages) -> Encoded:
    """A checked conversation (see `sft_problem`) in `tokenizer`'s chat format."""
    parts = (_llama3_parts if hasattr(tokenizer, "encode_header") else _llama2_parts)(
        tokenizer, messages)
    last = len(parts) - 1
    tokens, labels, response = [], [], []
    for i, (ids, is_label, is_content) in enumerate(parts):
        tokens += ids
        labels += [int(is_label)] * len(ids)
        response += [int(is_content and i in (last, last - 1))] * len(ids)
    return Encoded(np.asarray(tokens, np.int32), np.asarray(labels, np.int32),
                   np.asarray(response, np.int32))


def _llama3_parts(tok, messages):
    """[(ids, label?, content of an assistant message?)] of Llama 3's format; the last two
    parts are the last message's content and its <|eot_id|>."""
    parts = [([tok.bos_id], False, False)]
    for m in messages:
        assistant = m["role"] == "assistant"
        parts += [(tok.encode_header(m["role"]), False, False),
                  (tok.encode(m["content"], bos=False, eos=False), assistant, assistant),
                  ([tok.eot_id], assistant, False)]
    return parts


def _llama2_parts(tok, messages):
    """The same for Llama 2's `<s>[INST] q [/INST] a </s>` exchanges (tokenizer.py's format)."""
    if not hasattr(tok, "B_INST"):
        raise ValueError("the byte tokenizer has no chat format; post-train a checkpoint with "
                         "a Llama 2 or Llama 3 tokenizer.model (data.tokenizer).")
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] == "system":
        first = tok.B_SYS + msgs[0]["content"] + tok.E_SYS + msgs[1]["content"]
        msgs = [{"role": "user", "content": first}] + msgs[2:]
    parts = []
    for q, a in zip(msgs[::2], msgs[1::2]):
        head = f"{tok.B_INST} {q['content'].strip()} {tok.E_INST}"
        prefix = tok.encode(head, bos=True, eos=False)
        full = tok.encode(f"{head} {a['content'].strip()} ", bos=True, eos=True)
        # SentencePiece starts a new piece at the space before the answer, so the prompt's
        # tokens open the exchange's tokens; the answer is what follows, up to </s>.
        n = min(len(prefix), len(full) - 1)
        parts += [(full[:n], False, False), (full[n:-1], True, True), (full[-1:], True, False)]
    return parts


def encode_pair(tokenizer, pair) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) of a checked preference pair: prompt + each response."""
    return tuple(encode(tokenizer, pair["prompt"] + pair[side]) for side in ("chosen", "rejected"))


class Truncations:
    """Counts sequences cut to seq_len; logs the 1st, 2nd, 4th, 8th, ... (not every one)."""

    def __init__(self, seq_len: int, what: str):
        self.seq_len, self.what, self.count = seq_len, what, 0

    def __call__(self, e: Encoded) -> Encoded:
        if len(e.tokens) <= self.seq_len:
            return e
        self.count += 1
        if self.count & (self.count - 1) == 0:
            logging.warning("%d %s longer than data.seq_len %d tokens cut to it so far (this "
                            "one had %d).", self.count, self.what, self.seq_len, len(e.tokens))
        return e.cut(self.seq_len)


# ----------------------------------------------------------------------------------------------
# Pipelines.


def data_source(cfg: Any, split: str):
    """The TFDS source of the JSONL lines (whole lines: corpus.py's jsonl_field "")."""
    builder = corpus.prepare(corpus.make_config(cfg.name, cfg.files, jsonl_field=""),
                             cfg.data_dir)
    return builder.as_data_source(split)


def _examples(cfg, split: str, kind: str) -> grain.MapDataset:
    docs = grain.MapDataset.source(data_source(cfg, split))
    if cfg.shuffle and split == "train":
        docs = docs.shuffle(seed=cfg.seed)
    return docs.repeat(None)


def _parsed(kind):
    def fn(record):
        return parse(record["text"], kind)[0]  # None for a bad one: filtered out after
    return fn


def sft_dataset(cfg: Any, tokenizer, *, split: str = "train", process_index: int = 0,
                process_count: int = 1, prefetch: int = 2) -> grain.IterDataset:
    """Batches of packed conversations: {inputs, targets, positions, segment_ids, loss_mask}
    int32 [global_batch / process_count, seq_len] as llama_jax.data's, loss_mask 1 where the
    target is a label of the same conversation. Lane j of the batch packs conversations j,
    j+G, ... (G = global_batch), as llama_jax.data does for documents."""
    t = cfg.seq_len
    truncate = Truncations(t, "conversations")

    def tokenize(obj):
        e = truncate(encode(tokenizer, obj["messages"]))
        return {"tokens": e.tokens, "labels": e.labels}

    docs = _examples(cfg, split, "sft").map(_parsed("sft"))
    per_process = cfg.global_batch // process_count
    lanes = []
    for j in range(process_index * per_process, (process_index + 1) * per_process):
        lane = docs[j::cfg.global_batch].filter(lambda x: x is not None).map(tokenize)
        lane = lane.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        lanes.append(grain.experimental.FirstFitPackIterDataset(
            lane, length_struct={"tokens": t + 1, "labels": t + 1}, num_packing_bins=1,
            shuffle_bins=False))
    ds = grain.experimental.ZipIterDataset(lanes, strict=False).map(_sft_batch)
    return _prefetched(ds, prefetch)


def _sft_batch(rows) -> dict[str, np.ndarray]:
    tok = np.stack([r["tokens"] for r in rows]).astype(np.int32)
    seg = np.stack([r["tokens_segment_ids"] for r in rows]).astype(np.int32)
    pos = np.stack([r["tokens_positions"] for r in rows]).astype(np.int32)
    labels = np.stack([r["labels"] for r in rows]).astype(bool)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    return dict(inputs=tok[:, :-1], targets=tok[:, 1:], positions=pos[:, :-1],
                segment_ids=seg[:, :-1], loss_mask=(same & labels[:, 1:]).astype(np.int32))


def preference_dataset(cfg: Any, tokenizer, *, split: str = "train", process_index: int = 0,
                       process_count: int = 1, prefetch: int = 2) -> grain.IterDataset:
    """Batches of `global_batch` pairs, this process's share packed into twice as many rows:
    the fields of `pack_pairs`, [2 · global_batch / process_count, seq_len]."""
    truncate = Truncations(cfg.seq_len, "preference sequences")
    per_process = cfg.global_batch // process_count
    first = process_index * per_process

    def pack(pairs):
        mine = pairs[first:first + per_process]
        seqs = [truncate(e) for p in mine for e in encode_pair(tokenizer, p)]
        return pack_pairs(seqs, cfg.seq_len, first_pair=first)

    ds = (_examples(cfg, split, "preference").map(_parsed("preference"))
          .filter(lambda x: x is not None)
          .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
          .batch(cfg.global_batch, batch_fn=list).map(pack))
    return _prefetched(ds, prefetch)


def pack_pairs(seqs: list[Encoded], seq_len: int, *, first_pair: int = 0) -> dict:
    """Packs sequences [c0, r0, c1, r1, ...] (each <= seq_len tokens) first-fit into as many
    rows as sequences, of seq_len + 1 tokens, and returns int32 [rows, seq_len] fields:
    inputs, targets, positions, segment_ids, loss_mask (the target is a response content
    token of the same sequence), `sequence` (2·pair + 0 chosen / 1 rejected, pairs numbered
    from `first_pair`; -1 on padding) and `last` (1 on each sequence's last token)."""
    n, width = len(seqs), seq_len + 1
    fields = {k: np.zeros((n, width), np.int32) for k in ("tokens", "seg", "pos", "resp")}
    fields["seq"] = np.full((n, width), -1, np.int32)
    fields["last"] = np.zeros((n, width), np.int32)
    used, count = [0] * n, [0] * n
    for i, e in enumerate(seqs):
        k = len(e.tokens)
        assert k <= seq_len, (k, seq_len)
        row = next(r for r in range(n) if used[r] + k <= seq_len)  # every row fits one sequence
        at = slice(used[row], used[row] + k)
        count[row] += 1
        fields["tokens"][row, at], fields["resp"][row, at] = e.tokens, e.response
        fields["seg"][row, at], fields["pos"][row, at] = count[row], np.arange(k)
        fields["seq"][row, at] = 2 * first_pair + i
        fields["last"][row, used[row] + k - 1] = 1
        used[row] += k
    seg = fields["seg"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    return dict(inputs=fields["tokens"][:, :-1], targets=fields["tokens"][:, 1:],
                positions=fields["pos"][:, :-1], segment_ids=seg[:, :-1],
                loss_mask=(same & (fields["resp"][:, 1:] == 1)).astype(np.int32),
                sequence=fields["seq"][:, :-1], last=fields["last"][:, :-1])


def _prefetched(ds, prefetch: int):
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_dataset(kind: str, cfg: Any, tokenizer, **kw) -> grain.IterDataset:
    """sft_dataset or preference_dataset by `kind` ("sft" / "preference")."""
    return {"sft": sft_dataset, "preference": preference_dataset}[kind](cfg, tokenizer, **kw)
