"""Rejection sampling: K responses per prompt from a policy, the reward model's best kept as SFT
data (Llama 3 paper §4.2.2; llama_jax.rejection).

    python tools/rejection_sample.py --policy=sft_run/export --reward=rm_run/export \
        --prompts=prompts.jsonl --n=8 --output=sft_round2.jsonl [--temperature=0.8 --top_p=0.95]

--policy is any checkpoint llama_jax.load reads, --reward a reward export
(experiments/configs/reward.py). Each output line is {"messages": prompt + the best response,
"score": its reward}, the format experiments/configs/sft.py trains on; prompts whose samples all
hit --max_new_tokens unfinished are left out (counted) unless --keep_unfinished. The output is
written to a temporary file renamed into place at the end. Plain mistakes end in one `error:`
line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

# Run as a script, this repository's llama_jax (beside tools/) comes before an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama_jax  # noqa: E402
from llama_jax import checkpoint, cli, decode, io, rejection, reward  # noqa: E402
from llama_jax import tokenizer as tokenizer_lib  # noqa: E402
from llama_jax.sampling import SamplingParams  # noqa: E402


def load_tokenizer(policy: str, spec: str | None):
    """--tokenizer, else the policy checkpoint's; it must have a chat format."""
    spec = spec or io.tokenizer_file(policy) or checkpoint.tokenizer_spec(policy)
    if not spec or spec == tokenizer_lib.BYTE:
        raise ValueError(f"{policy} stores no chat tokenizer; pass --tokenizer=FILE (a Llama 2 "
                         f"or Llama 3 tokenizer.model).")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--tokenizer={spec} does not exist.")
    return tokenizer_lib.load_tokenizer(spec)


def sample(a) -> dict:
    """Runs the sampling of parsed flags `a`; returns the summary numbers."""
    if a.n < 1 or a.max_new_tokens < 1:
        raise ValueError(f"--n ({a.n}) and --max_new_tokens ({a.max_new_tokens}) must be >= 1.")
    if os.path.exists(a.output) and not a.overwrite:
        raise FileExistsError(f"{a.output} exists; choose another --output or pass --overwrite.")
    if not os.path.isfile(a.prompts):
        raise FileNotFoundError(f"--prompts={a.prompts} does not exist.")
    sampling = SamplingParams(a.temperature, a.top_k, a.top_p)
    sampling.validate(sys.maxsize)  # ranges now; top_k against the vocabulary in generate
    io.detect_format(a.policy)
    if not reward.is_reward_checkpoint(a.reward):
        raise FileNotFoundError(f"--reward={a.reward} is not a reward model export; train one "
                                f"with experiments/configs/reward.py.")
    tok = load_tokenizer(a.policy, a.tokenizer)
    prompts = rejection.read_prompts(a.prompts)
    policy = llama_jax.with_backend(llama_jax.load(a.policy, dtype=a.dtype, param_dtype=a.dtype),
                                    llama_jax.backends.get(a.backend))
    rm = reward.load(a.reward, dtype=a.dtype)
    for m in (policy, rm):
        decode.check_vocab(tok.vocab_size, m.config)
    return _write(a, rejection.best_of_n(
        policy, rm, tok, prompts, n=a.n, sampling=sampling, max_new_tokens=a.max_new_tokens,
        batch_rows=max(a.batch_rows, a.n), seed=a.seed, keep_unfinished=a.keep_unfinished),
        len(prompts))


def _write(a, results, n_prompts: int) -> dict:
    """Writes the kept examples to a temporary sibling of --output, renamed at the end."""
    directory = os.path.dirname(os.path.abspath(a.output))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(a.output)}-", dir=directory)
    kept, best, every, t = 0, [], [], time.perf_counter()
    try:
        with os.fdopen(fd, "w") as f:
            for done, r in enumerate(results, 1):
                every += [s for s in r.scores if s == s]  # NaN: unfinished
                if r.best is not None:
                    f.write(json.dumps(r.best) + "\n")
                    kept, best = kept + 1, best + [r.best["score"]]
                print(f"\r{done}/{n_prompts} prompts, {kept} kept, "
                      f"{time.perf_counter() - t:.0f}s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        os.replace(tmp, a.output)
    except BaseException:
        os.unlink(tmp)
        raise
    return dict(prompts=n_prompts, kept=kept, mean_best=float(np.mean(best)) if best else None,
                mean_all=float(np.mean(every)) if every else None)


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="checkpoint to sample from")
    p.add_argument("--reward", required=True, help="reward model export to score with")
    p.add_argument("--prompts", required=True, help="JSONL, one conversation ending in a user "
                   "turn per line ({\"messages\": [...]} or {\"prompt\": [...]})")
    p.add_argument("--n", type=int, required=True, help="samples per prompt (K)")
    p.add_argument("--output", required=True, help="JSONL of the kept SFT examples")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_rows", type=int, default=64, help="rows per decode call (whole "
                   "prompts × n; at least n)")
    p.add_argument("--keep_unfinished", action="store_true", help="let responses that hit "
                   "--max_new_tokens without a stop token compete")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the policy's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backend", choices=("auto", "plain", "cpu"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    a = p.parse_args(argv)
    s = cli.call(lambda: sample(a), unwind_on_sigterm=True)
    mean = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"Kept {s['kept']} of {s['prompts']} prompts in {a.output}; mean reward of the kept "
          f"{mean(s['mean_best'])}, of every finished sample {mean(s['mean_all'])}.")


if __name__ == "__main__":
    main()
