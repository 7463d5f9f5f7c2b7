"""Trains a SentencePiece BPE tokenizer with LLaMA's settings on a corpus of local text.

    path = tokenizer_training.train("/tmp/tok/web", vocab_size=32000, files="corpus/*.jsonl")
    tokenizer = llama_jax.tokenizer.load_tokenizer(path)      # "/tmp/tok/web.model"

Writes <output>.model and <output>.vocab. The corpus is read as `llama_jax.corpus` reads it
(glob of text or JSONL files; "" = the Python standard library). `tools/train_tokenizer.py` is
the command-line form; `--config.data.tokenizer=train:V` trains one at the start of a run.

The trainer options are those stored in LLaMA 1/2's `tokenizer.model` (its trainer_spec and
normalizer_spec; Touvron et al. 2023 §2.1: "we split all numbers into individual digits, and
fallback to bytes to decompose unknown UTF-8 characters"): BPE, byte fallback, split digits,
whitespace-only pieces allowed, no normalisation (identity, extra whitespace kept), a dummy
prefix space, unk 0 / bos 1 / eos 2 and no pad piece.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from llama_jax import corpus

# Values of LLaMA 2's trainer_spec (read from its tokenizer.model) that are not defaults.
LLAMA_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
    max_sentence_length=4192, split_by_unicode_script=True, split_by_number=True,
    shuffle_input_sentence=True)


def sentences(files: str = "", jsonl_field: str = "text") -> Iterator[str]:
    """Non-empty lines of every document: SentencePiece trains on lines, as LLaMA's did."""
    root = corpus.corpus_root(files)
    for path in corpus.corpus_files(files):
        for _, text in corpus.read_documents(path, root, jsonl_field):
            yield from (line for line in text.splitlines() if line.strip())


def train(output: str, *, vocab_size: int, files: str = "", jsonl_field: str = "text",
          max_sentences: int = 10_000_000, num_threads: int = 0) -> str:
    """Trains and writes `<output>.model`; returns its path."""
    import sentencepiece as spm
    # 256 byte pieces + unk/bos/eos must fit below the merges (byte_fallback).
    if vocab_size <= 259:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beside the 256 byte pieces "
                         f"and 3 specials; use at least 300.")
    lines = sentences(files, jsonl_field)  # raises before training on an empty glob
    first = next(lines, None)
    if first is None:
        raise ValueError(f"the corpus {files or 'stdlib'!r} has no non-empty lines to train on.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chain(first, lines), model_prefix=output, vocab_size=vocab_size,
        input_sentence_size=max_sentences, num_threads=num_threads or os.cpu_count(),
        minloglevel=2, **LLAMA_OPTIONS)
    return output + ".model"


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
