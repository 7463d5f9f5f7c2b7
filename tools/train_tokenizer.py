"""Trains a SentencePiece BPE tokenizer with LLaMA's settings on local text.

    python tools/train_tokenizer.py --output=/tmp/tok/stdlib --vocab_size=8000
    python tools/train_tokenizer.py --files='corpus/**/*.jsonl' --jsonl_field=text \
        --output=/tmp/tok/web --vocab_size=32000

Writes <output>.model and <output>.vocab; load the model with
`llama_jax.tokenizer.load_tokenizer("<output>.model")`. The trainer and LLaMA's options are in
`llama_jax/tokenizer_training.py`; this file only parses flags.
"""

import os
import sys

# Inside a checkout the tool runs that checkout's llama_jax; a copy elsewhere, the installed one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "llama_jax", "__init__.py")):
    sys.path.insert(0, _ROOT)

from absl import flags  # noqa: E402

from llama_jax import cli, tokenizer_training  # noqa: E402

_FILES = flags.DEFINE_string("files", "", "Glob of text or .jsonl files; empty = the Python "
                             "stdlib.")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", "text", "Field of each JSONL object holding "
                                   "the text.")
_OUTPUT = flags.DEFINE_string("output", None, "Model prefix: writes <output>.model and .vocab.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "Pieces in the model (LLaMA 1/2: 32000).")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 10_000_000, "Lines sampled for training, "
                                      "at most.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 0, "Trainer threads; 0 = all cores.")
flags.mark_flag_as_required("output")


def main(argv):
    del argv
    try:
        path = tokenizer_training.train(
            _OUTPUT.value, vocab_size=_VOCAB_SIZE.value, files=_FILES.value,
            jsonl_field=_JSONL_FIELD.value, max_sentences=_MAX_SENTENCES.value,
            num_threads=_NUM_THREADS.value)
    except (ValueError, PermissionError) as e:  # plain mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
