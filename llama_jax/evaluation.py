"""Held-out sets: loss, perplexity and bits per byte of named sets of documents.

    sets = evaluation.load_sets("validation,code=held/*.py,web=held/web.jsonl", tokenizer,
                                data_cfg, rows=8, seq_len=2048, max_tokens=8 * 8 * 2048)
    evaluation.results(sets, lambda batch: train.eval_step(params, batch, graphdef))
    # {"eval/code/loss": ..., "eval/code/perplexity": ..., "eval/code/bits_per_byte": ..., ...}

A spec is comma-separated entries NAME=SOURCE or SOURCE: "validation" is the run's corpus's
held-out split (data.DataConfig), anything else a glob of files (.jsonl/.json: one document per
line, its `jsonl_field`; other files: one document each). A set's name defaults to
"validation" or the glob's file name without its extension.

Every document is tokenized as in training (BOS + text + EOS) and every token after BOS is
predicted exactly once: a document is cut into chunks of seq_len + 1 tokens that overlap by
one (each chunk starts its own context at position 0), and chunks are packed into rows with
their own segment ids. A set is its first documents, whole, up to `max_tokens` (0: all).
Bits per byte = the summed cross-entropy / ln 2 / the UTF-8 bytes of those documents' text,
so models with different tokenizers compare. The training loop (train.eval_sets) and
tools/evaluate.py both go through here with the same rows and seq_len, so they agree.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterable, Iterator

import numpy as np

from llama_jax import corpus

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
VALIDATION = "validation"


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A packed held-out set: global batches {field: int32 [rows, seq_len]} (FIELDS), the
    documents used, and the UTF-8 bytes of their text."""

    name: str
    batches: list[dict[str, np.ndarray]]
    n_docs: int
    n_bytes: int


def parse(spec: str) -> list[tuple[str, str]]:
    """[(name, source)] of a spec; one-sentence errors for empty or repeated names."""
    entries = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, eq, source = entry.partition("=")
        if not eq:
            source = entry
            name = VALIDATION if entry == VALIDATION else os.path.splitext(
                os.path.basename(entry))[0]
        if not name.strip() or not source.strip():
            raise ValueError(f"eval set {entry!r} needs NAME=SOURCE with both parts, or a "
                             f"SOURCE alone (a file glob or {VALIDATION!r}).")
        entries.append((name.strip(), source.strip()))
    names = [n for n, _ in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"eval set name {repeated[0]!r} is used twice; name each set "
                         "(NAME=SOURCE).")
    return entries


def check(spec: str, *, corpus_split: bool = True) -> None:
    """Raises the one-sentence error of a spec whose files are missing or empty, or that names
    the corpus's split where there is none, without reading any document."""
    for name, source in parse(spec):
        try:
            if source != VALIDATION:
                corpus.corpus_files(source)
            elif not corpus_split:
                raise ValueError(f"{VALIDATION!r} is a training corpus's held-out split, which "
                                 "only a training run has; name files instead.")
        except ValueError as e:
            raise ValueError(f"eval set {name!r} ({source}): {e}") from None


def documents(source: str, data_cfg=None, jsonl_field: str = "text") -> Iterator[str]:
    """The texts of a source: the corpus's validation split, or the files of a glob."""
    if source == VALIDATION:
        from llama_jax import data
        split = data.data_source(data_cfg, VALIDATION)
        for i in range(len(split)):
            text = split[i]["text"]
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return
    root = corpus.corpus_root(source)
    for path in corpus.corpus_files(source):
        for _, text in corpus.read_documents(path, root, jsonl_field):
            yield text


def load_sets(spec: str, tokenizer, data_cfg=None, *, rows: int, seq_len: int,
              max_tokens: int = 0, jsonl_field: str | None = None) -> list[EvalSet]:
    """The sets of a spec, tokenized and packed (a mistake is one sentence, raised here)."""
    check(spec, corpus_split=data_cfg is not None)
    field = jsonl_field or (data_cfg.jsonl_field if data_cfg is not None else "text")
    sets = []
    for name, source in parse(spec):
        try:
            s = pack(name, documents(source, data_cfg, field), tokenizer, rows=rows,
                     seq_len=seq_len, max_tokens=max_tokens)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"eval set {name!r} ({source}): {e}") from None
        sets.append(s)
    return sets


def pack(name: str, texts: Iterable[str], tokenizer, *, rows: int, seq_len: int,
         max_tokens: int = 0) -> EvalSet:
    """Packs whole documents into batches of [rows, seq_len] until max_tokens (0: all)."""
    t = seq_len
    filled: list[dict[str, np.ndarray]] = []
    row, offset, segment = _empty_row(t), 0, 0
    n_docs = n_bytes = n_tokens = 0
    for text in texts:
        if max_tokens and n_tokens >= max_tokens:
            break
        ids = tokenizer.encode(text, bos=True, eos=True)
        for start in range(0, len(ids) - 1, t):
            chunk = np.asarray(ids[start:start + t + 1], np.int32)
            n = len(chunk) - 1
            if offset + n > t:
                filled.append(row)
                row, offset, segment = _empty_row(t), 0, 0
            segment += 1
            span = slice(offset, offset + n)
            row["inputs"][span], row["targets"][span] = chunk[:-1], chunk[1:]
            row["positions"][span], row["segment_ids"][span] = np.arange(n), segment
            row["loss_mask"][span] = 1
            offset += n
            n_tokens += n
        n_docs, n_bytes = n_docs + 1, n_bytes + len(text.encode("utf-8"))
    if n_docs == 0:
        raise ValueError("it holds no document with text; point it at files that hold text.")
    filled.append(row)
    filled += [_empty_row(t)] * (-len(filled) % rows)  # whole batches
    batches = [{k: np.stack([r[k] for r in filled[i:i + rows]]) for k in FIELDS}
               for i in range(0, len(filled), rows)]
    return EvalSet(name, batches, n_docs, n_bytes)


def _empty_row(t: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((t,), np.int32) for k in FIELDS}


def results(sets: list[EvalSet], eval_fn: Callable, *, process_index: int = 0,
            process_count: int = 1) -> dict[str, float]:
    """{"eval/NAME/loss" (nats per token), ".../perplexity", ".../bits_per_byte"} of each set.

    eval_fn(batch) -> (summed cross-entropy, token count) of this process's rows of a batch
    (train.eval_step); the sums are global."""
    out = {}
    for s in sets:
        ce = count = 0.0
        for batch in s.batches:
            per = len(batch["inputs"]) // process_count
            mine = {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}
            c, n = eval_fn(mine)
            ce, count = ce + float(c), count + float(n)
        out.update(metrics(s.name, ce, count, s.n_bytes))
    return out


def metrics(name: str, ce: float, n_tokens: float, n_bytes: int) -> dict[str, float]:
    loss = ce / max(n_tokens, 1.0)
    return {f"eval/{name}/loss": loss, f"eval/{name}/perplexity": math.exp(min(loss, 700.0)),
            f"eval/{name}/bits_per_byte": ce / math.log(2) / max(n_bytes, 1)}
