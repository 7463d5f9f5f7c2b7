"""Needle in a haystack (llama_jax.needle, tools/needle.py): prompts of exact lengths with the
needle at its depth, scores that follow what the model returns, JSON and PNG written."""

import json
import os

import pytest

from llama_jax import needle
from llama_jax.tokenizer import ByteTokenizer

TEXTS = ["Filler sentence number one. " * 50, "Another document about nothing. " * 50]


def test_prompts_have_exact_length_and_needle_at_depth():
    tok = ByteTokenizer()
    filler = needle.filler_ids(tok, TEXTS, 400)
    needle_ids = tok.encode(" " + needle.NEEDLE.format(answer="99") + " ", bos=False, eos=False)
    starts = []
    for depth in (0, 0.5, 1):
        ids, at = needle.prompt(tok, filler, 400, depth, answer="99")
        assert len(ids) == 400 and ids[0] == tok.bos_id
        assert ids[at:at + len(needle_ids)] == needle_ids
        assert tok.decode(ids).endswith("Answer: " + needle.ANSWER_PREFIX)
        starts.append(at)
    room = 400 - 1 - len(needle_ids) - len(tok.encode(
        f"\n\nQuestion: {needle.QUESTION}\nAnswer: {needle.ANSWER_PREFIX}", bos=False, eos=False))
    assert starts == [1, 1 + round(room / 2), 1 + room]


def test_scores_follow_the_model():
    tok = ByteTokenizer()

    def reads_first_300_tokens(prompts, n):  # retrieves only needles within its "context"
        out = []
        for ids in prompts:
            seen = tok.decode(ids[:300])
            found = needle.NEEDLE.format(answer=needle.ANSWER) in seen
            out.append(tok.encode(f" {needle.ANSWER}." if found else " 12.", bos=False,
                                  eos=False)[:n])
        return out
    filler = needle.filler_ids(tok, TEXTS, 900)
    r = needle.run(reads_first_300_tokens, tok, filler, lengths=[200, 900], depths=[0, 0.5, 1])
    assert r["scores"] == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="fractions in"):
        needle.run(reads_first_300_tokens, tok, filler, lengths=[200], depths=[50])
    with pytest.raises(ValueError, match="no room for filler"):
        needle.run(reads_first_300_tokens, tok, filler, lengths=[100, 200], depths=[0])
    with pytest.raises(ValueError, match="more text"):
        needle.filler_ids(tok, TEXTS[:1], 10_000)


def test_tool_writes_json_and_heat_map(tmp_path):
    import llama_jax
    from llama_jax import checkpoint
    from tools import needle as tool
    c = llama_jax.get_config("tiny", vocab_size=259, n_layers=1, dim=32, n_heads=2,
                             n_kv_heads=1, ffn_dim=64, max_seq_len=256)
    checkpoint.save_params(str(tmp_path / "ckpt"), llama_jax.create(c), tokenizer_path="byte")
    (tmp_path / "hay.txt").write_text(TEXTS[0] * 2)
    out = tmp_path / "out"
    tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), "--lengths",
               "160,240", "--depths", "0,1", "--haystack", str(tmp_path / "hay.txt"),
               "--max_new_tokens", "8"])
    result = json.load(open(out / "needle.json"))
    assert result["lengths"] == [160, 240] and len(result["scores"][0]) == 2
    assert all(s in (0.0, 1.0) for row in result["scores"] for s in row)
    assert open(out / "needle.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["needle.json", "needle.png"]  # no temporary left
    with pytest.raises(SystemExit) as e:  # past max_seq_len: one line, before decoding
        tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(out),
                   "--lengths", "251", "--haystack", str(tmp_path / "hay.txt")])
    assert e.value.code == 2
