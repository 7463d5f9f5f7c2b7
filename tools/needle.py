"""Needle in a haystack over prompt lengths × needle depths: scores as JSON, a heat map as PNG.

    python tools/needle.py --checkpoint=DIR --lengths=1024,4096,16384 \\
        --depths=0,0.25,0.5,0.75,1 --output=needle_out [--haystack='docs/*.txt']

Greedy decoding (llama_jax.decode) of up to --max_new_tokens after each prompt; a cell is 1
when the continuation contains the answer (llama_jax.needle). The haystack defaults to the
Python standard library's source, which every machine has. Writes OUTPUT/needle.json and
OUTPUT/needle.png (each written beside and renamed into place); prints the score table.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import cli  # noqa: E402


def evaluate(checkpoint: str, output: str, *, lengths, depths, haystack: str = "",
             max_new_tokens: int = 16, dtype: str | None = None) -> dict:
    from llama_jax import checkpoint as checkpoint_lib
    from llama_jax import corpus, decode, io, needle
    from llama_jax import tokenizer as tokenizer_lib

    spec = io.tokenizer_file(checkpoint) or checkpoint_lib.tokenizer_spec(checkpoint)
    if spec is None:
        raise ValueError(f"{checkpoint} stores no tokenizer; the needle needs text.")
    tok = tokenizer_lib.load_tokenizer(spec)
    needle.check(tok, lengths, depths)  # mistakes before the model is loaded
    paths = corpus.corpus_files(haystack)  # "" = the stdlib; raises on no match
    texts = (open(p, encoding="utf-8", errors="replace").read() for p in paths)
    filler = needle.filler_ids(tok, texts, max(lengths))
    model = io.load(checkpoint)
    if max(lengths) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"--lengths up to {max(lengths)} plus {max_new_tokens} new tokens "
                         f"exceed the model's max_seq_len {model.config.max_seq_len}.")
    weights = decode.prepare(decode.with_dtype(model, dtype) if dtype else model)
    del model

    def generate(prompts, n):
        # max_len fixed, so lengths in one power-of-two bucket share one compiled program
        out = decode.generate(weights, prompts, n, stop_ids=list(tok.stop_ids),
                              max_len=weights.config.max_seq_len)
        return [out.ids(b) for b in range(len(prompts))]

    result = needle.run(generate, tok, filler, lengths=lengths, depths=depths,
                        max_new_tokens=max_new_tokens)
    result["checkpoint"] = os.path.abspath(checkpoint)
    os.makedirs(output, exist_ok=True)
    _atomic(os.path.join(output, "needle.json"), lambda p: _write_json(p, result))
    _atomic(os.path.join(output, "needle.png"), lambda p: needle.heat_map(
        result, p, title=os.path.basename(os.path.normpath(checkpoint))))
    return result


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)


def _atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"  # keeps the extension
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="any directory llama_jax.load reads")
    p.add_argument("--output", required=True, help="folder for needle.json and needle.png")
    p.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1024,4096")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--haystack", default="", help="glob of filler text (default: the stdlib)")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: as saved")
    a = p.parse_args(argv)
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
        depths = [float(x) for x in a.depths.split(",")]
    except ValueError:
        p.error(f"--lengths takes integers and --depths fractions, comma-separated; got "
                f"{a.lengths!r} and {a.depths!r}")
    result = cli.call(lambda: evaluate(a.checkpoint, a.output, lengths=lengths, depths=depths,
                                       haystack=a.haystack, max_new_tokens=a.max_new_tokens,
                                       dtype=a.dtype))
    print("depth \\ tokens " + " ".join(f"{n:>7d}" for n in result["lengths"]))
    for j, d in enumerate(result["depths"]):
        print(f"{d:>14.0%} " + " ".join(f"{row[j]:>7.0f}" for row in result["scores"]))


if __name__ == "__main__":
    main()
