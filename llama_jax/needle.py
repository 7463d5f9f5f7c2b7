"""Needle in a haystack: can the model repeat a fact hidden at a given depth of a long prompt?

    filler = needle.filler_ids(tokenizer, texts, 4096)     # haystack tokens, checked first
    result = needle.run(generate, tokenizer, filler, lengths=[1024, 4096], depths=[0, 0.5, 1])
    needle.heat_map(result, "needle.png")

Each prompt is exactly `length` tokens: BOS, filler text (any documents, cut at token
boundaries), the needle sentence inserted after `depth` of the filler (0 = first, 1 = last),
then the question and the start of the answer. A cell scores 1 when the greedy continuation
contains the answer, else 0. `generate(prompts, max_new_tokens)` returns the new token ids of
each prompt (tools/needle.py: decode.generate), so all depths of one length are one batch of
one compiled shape.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

ANSWER = "4817"
NEEDLE = "The secret number of the harbour is {answer}."
QUESTION = "What is the secret number of the harbour?"
ANSWER_PREFIX = "The secret number of the harbour is"


def filler_ids(tokenizer, texts: Iterable[str], n: int) -> list[int]:
    """The first n tokens of the texts, one after another (no BOS/EOS between them)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + "\n\n", bos=False, eos=False)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the haystack text has {len(ids)} tokens but the longest prompt needs "
                     f"{n}; give more text or shorter lengths.")


def prompt(tokenizer, filler: Sequence[int], length: int, depth: float,
           answer: str = ANSWER) -> tuple[list[int], int]:
    """(prompt of exactly `length` ids, index of the needle's first token)."""
    needle = tokenizer.encode(" " + NEEDLE.format(answer=answer) + " ", bos=False, eos=False)
    tail = tokenizer.encode(f"\n\nQuestion: {QUESTION}\nAnswer: {ANSWER_PREFIX}", bos=False,
                            eos=False)
    room = length - 1 - len(needle) - len(tail)
    if room < 1:
        raise ValueError(f"length {length} leaves no room for filler around the needle and "
                         f"question ({len(needle) + len(tail) + 1} tokens); use longer prompts.")
    at = round(depth * room)
    ids = [tokenizer.bos_id, *filler[:at], *needle, *filler[at:room], *tail]
    return ids, 1 + at


def check(tokenizer, lengths: Sequence[int], depths: Sequence[float]) -> None:
    """One sentence for depths outside [0, 1] or lengths too short for the needle/question."""
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad or not depths or not lengths:
        raise ValueError(f"depths must be fractions in [0, 1] (got {list(depths)}) and lengths "
                         f"given (got {list(lengths)}).")
    prompt(tokenizer, [tokenizer.bos_id] * max(lengths), min(lengths), 0.0)  # raises if short


def run(generate: Callable, tokenizer, filler: Sequence[int], *, lengths: Sequence[int],
        depths: Sequence[float], answer: str = ANSWER, max_new_tokens: int = 16) -> dict:
    """{"lengths", "depths", "scores" [len(lengths)][len(depths)], "outputs" (same shape)};
    filler: at least max(lengths) haystack tokens (`filler_ids`)."""
    check(tokenizer, lengths, depths)
    scores, outputs = [], []
    for length in lengths:
        prompts = [prompt(tokenizer, filler, length, d, answer)[0] for d in depths]
        texts_out = [tokenizer.decode(ids) for ids in generate(prompts, max_new_tokens)]
        outputs.append(texts_out)
        scores.append([float(answer in t) for t in texts_out])
    return dict(lengths=list(lengths), depths=list(depths), answer=answer, scores=scores,
                outputs=outputs)


def heat_map(result: dict, path: str, title: str = "Needle in a haystack") -> None:
    """The scores as a PNG: depth down, length across, green = retrieved."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    scores = [[result["scores"][i][j] for i in range(len(result["lengths"]))]
              for j in range(len(result["depths"]))]  # [depth][length]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(result["lengths"]),
                                    1.2 + 0.5 * len(result["depths"])))
    ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("needle depth")
    mean = sum(itertools.chain.from_iterable(scores)) / max(1, sum(map(len, scores)))
    ax.set_title(f"{title} (mean {mean:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
