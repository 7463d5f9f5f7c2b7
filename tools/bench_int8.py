"""int8 weights against bf16: weight memory, greedy agreement over 32 tokens, logit error.

    python tools/bench_int8.py --checkpoint=DIR              # any checkpoint llama_jax.load reads
    python tools/bench_int8.py --preset=bench                # random init of a preset

Prompts are random token ids (seeded) of --prompt_len tokens, or windows of --text.
Agreement: bf16 generates --new greedy tokens; int8 agrees at step t if its argmax after the
same prefix is bf16's token (teacher-forced, so one early flip does not count every later token
as a miss); "all 32" counts prompts whose 32 tokens all agree, i.e. whose int8 greedy output
equals bf16's. Logit error:
max |int8 - bf16| over every position of those sequences, and the same for bf16 against f32
for scale. Prints one JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax import checkpoint, decode, model as model_lib, quantize  # noqa: E402
from llama_jax.decode_setup import with_dtype  # noqa: E402


logits_of = jax.jit(decode.logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--preset")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--text", help="byte-level models: prompts are windows of this file's "
                    "bytes (held-in text) instead of random ids")
    args = ap.parse_args()
    if args.checkpoint:
        model = (checkpoint.load_params(args.checkpoint, dtype="float32")
                 if checkpoint.is_params_checkpoint(args.checkpoint)
                 else llama_jax.load(args.checkpoint, dtype="float32", param_dtype="float32"))
    else:
        model = model_lib.create(llama_jax.get_config(args.preset, dtype="float32",
                                                      param_dtype="float32"))
    f32 = decode.prepare(model, kernel=False)
    bf16 = decode.prepare(with_dtype(model, "bfloat16"), kernel=False)
    q = quantize.int8(bf16)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.config.vocab_size, (args.prompts, args.prompt_len)).tolist()
    if args.text:  # the byte tokenizer's ids: BOS, then UTF-8 bytes + 3
        data = open(args.text, "rb").read()
        starts = np.linspace(0, len(data) - args.prompt_len, args.prompts).astype(int)
        prompts = [[1] + [b + 3 for b in data[s:s + args.prompt_len - 1]] for s in starts]
    out = decode.generate(bf16, prompts, args.new, stop_ids=[])
    greedy = np.stack([out.ids(i) for i in range(len(prompts))])
    tokens = jnp.asarray(np.concatenate([np.array(prompts), greedy], axis=1))
    lb, lq, lf = (np.asarray(logits_of(w, tokens)) for w in (bf16, q, f32))
    cut = slice(args.prompt_len - 1, -1)
    agree = np.argmax(lq[:, cut], axis=-1) == greedy
    print(json.dumps(dict(
        model=args.checkpoint or args.preset, params=model_lib.param_count(model),
        int8_bytes=quantize.nbytes(q), bf16_bytes=quantize.nbytes(bf16),
        memory_ratio=round(quantize.nbytes(q) / quantize.nbytes(bf16), 4),
        token_agreement=round(float(agree.mean()), 4),
        prompts_all_agree=f"{int(agree.all(axis=1).sum())}/{len(prompts)}",
        max_logit_err_int8_vs_bf16=float(np.max(np.abs(lq - lb))),
        max_logit_err_bf16_vs_f32=float(np.max(np.abs(lb - lf))),
        logit_std=float(np.std(lb)))))


if __name__ == "__main__":
    main()
