"""Loss, perplexity and bits per byte of a finished checkpoint on held-out files.

    python tools/evaluate.py --checkpoint=workdir/export --files="code=held/*.py,web=held/w.jsonl"

--files takes the spec of the training loop's train.eval_sets (NAME=GLOB entries, or a GLOB
named after its file), evaluated by llama_jax.evaluation. With the run's --seq_len, --rows
(data.global_batch) and --max_batches (train.eval_batches) it gives the numbers the loop
reported at the same weights. Prints one line per set, then the metrics as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import cli  # noqa: E402


def evaluate(checkpoint: str, files: str, *, seq_len: int = 0, rows: int = 8,
             max_batches: int = 0, dtype: str | None = None, tokenizer: str | None = None,
             jsonl_field: str = "text") -> dict[str, float]:
    """The metrics of llama_jax.evaluation.results for the sets of `files`."""
    import jax
    from flax import nnx

    from llama_jax import checkpoint as checkpoint_lib
    from llama_jax import evaluation, io, train
    from llama_jax import tokenizer as tokenizer_lib

    if rows < 1 or seq_len < 0 or max_batches < 0:
        raise ValueError(f"--rows ({rows}) must be >= 1, --seq_len ({seq_len}) and "
                         f"--max_batches ({max_batches}) >= 0.")
    evaluation.check(files, corpus_split=False)  # missing or empty files: before loading
    spec = tokenizer or io.tokenizer_file(checkpoint) or checkpoint_lib.tokenizer_spec(checkpoint)
    if spec is None:
        raise ValueError(f"{checkpoint} stores no tokenizer; pass --tokenizer=PATH or "
                         "--tokenizer=byte.")
    tok = tokenizer_lib.load_tokenizer(spec)
    model = io.load(checkpoint, **({"dtype": dtype, "param_dtype": dtype} if dtype else {}))
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}; lower it.")
    sets = evaluation.load_sets(files, tok, rows=rows, seq_len=seq_len,
                                max_tokens=max_batches * rows * seq_len, jsonl_field=jsonl_field)
    graphdef, params = nnx.split(model, nnx.Param)
    out = evaluation.results(sets, lambda b: train.eval_step(params, jax.tree.map(
        jax.numpy.asarray, b), graphdef))
    for s in sets:
        print(f"{s.name}: loss {out[f'eval/{s.name}/loss']:.4f} | perplexity "
              f"{out[f'eval/{s.name}/perplexity']:.3f} | bits/byte "
              f"{out[f'eval/{s.name}/bits_per_byte']:.4f} ({s.n_docs} documents, "
              f"{s.n_bytes:,} bytes)", flush=True)
    return out


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="any directory llama_jax.load reads")
    p.add_argument("--files", required=True, help="NAME=GLOB,... (train.eval_sets' form)")
    p.add_argument("--seq_len", type=int, default=0, help="row length (default max_seq_len)")
    p.add_argument("--rows", type=int, default=8, help="rows per batch (data.global_batch)")
    p.add_argument("--max_batches", type=int, default=0,
                   help="documents up to this many batches per set (train.eval_batches); 0: all")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: as saved")
    p.add_argument("--tokenizer", help='a tokenizer.model or "byte" (default: the checkpoint\'s)')
    p.add_argument("--jsonl_field", default="text", help="field of .jsonl lines with the text")
    a = p.parse_args(argv)
    out = cli.call(lambda: evaluate(a.checkpoint, a.files, seq_len=a.seq_len, rows=a.rows,
                                    max_batches=a.max_batches, dtype=a.dtype,
                                    tokenizer=a.tokenizer, jsonl_field=a.jsonl_field))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
