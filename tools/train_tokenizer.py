"""Trains a SentencePiece BPE tokenizer with LLaMA's settings on local text.

    python tools/train_tokenizer.py --output=/tmp/tok/stdlib --vocab_size=8000
    python tools/train_tokenizer.py --files='corpus/**/*.jsonl' --jsonl_field=text \
        --output=/tmp/tok/web --vocab_size=32000

Writes <output>.model and <output>.vocab; load the model with
`llama_jax.tokenizer.load_tokenizer("<output>.model")` and pass it to `llama_jax.data`.

The trainer options are those stored in LLaMA 1/2's `tokenizer.model` (its trainer_spec and
normalizer_spec; Touvron et al. 2023 §2.1: "we split all numbers into individual digits, and
fallback to bytes to decompose unknown UTF-8 characters"): BPE, byte fallback, split digits,
whitespace-only pieces allowed, no normalisation (identity, extra whitespace kept), a dummy
prefix space, unk 0 / bos 1 / eos 2 and no pad piece.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from absl import app, flags

# The corpus reader lives in the repo's data/ package, beside this tools/ folder.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import text_files  # noqa: E402

# Values of LLaMA 2's trainer_spec (read from its tokenizer.model) that are not defaults.
LLAMA_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
    max_sentence_length=4192, split_by_unicode_script=True, split_by_number=True,
    shuffle_input_sentence=True)


def sentences(files: str = "", jsonl_field: str = "text") -> Iterator[str]:
    """Non-empty lines of every document: SentencePiece trains on lines, as LLaMA's did."""
    root = text_files.corpus_root(files)
    for path in text_files.corpus_files(files):
        for _, text in text_files.read_documents(path, root, jsonl_field):
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


def _define_flags() -> None:
    """Flags are defined only when run as a program, so importing `train` (tests, notebooks)
    cannot clash with other tools' flag names."""
    flags.DEFINE_string("files", "", "Glob of text or .jsonl files; empty = the Python stdlib.")
    flags.DEFINE_string("jsonl_field", "text", "Field of each JSONL object holding the text.")
    flags.DEFINE_string("output", None, "Model prefix: writes <output>.model and .vocab.")
    flags.DEFINE_integer("vocab_size", 32000, "Pieces in the model (LLaMA 1/2: 32000).")
    flags.DEFINE_integer("max_sentences", 10_000_000, "Lines sampled for training, at most.")
    flags.DEFINE_integer("num_threads", 0, "Trainer threads; 0 = all cores.")
    flags.mark_flag_as_required("output")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    path = train(FLAGS.output, vocab_size=FLAGS.vocab_size, files=FLAGS.files,
                 jsonl_field=FLAGS.jsonl_field, max_sentences=FLAGS.max_sentences,
                 num_threads=FLAGS.num_threads)
    print(path)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
