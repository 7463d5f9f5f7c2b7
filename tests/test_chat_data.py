"""Conversation data: label masks exactly as specified (Llama 3 and Llama 2 formats), bad
examples logged with file:line and skipped, packing that never splits an example, preference
rows, and exact resume of both iterators.

The Llama 3 tokenizer.model is read from the installed llama_models package."""

import json
import logging
import os

import llama_models.llama3.tokenizer as meta_tok
import numpy as np
import pytest

from llama_jax import chat_data, data
from llama_jax import tokenizer as tok_lib

LLAMA3 = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def llama3():
    return tok_lib.load_tokenizer(LLAMA3)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_llama3_labels_are_assistant_content_and_eot_only(llama3):
    e = chat_data.encode(llama3, CONVERSATION)
    # the tokens are the tokenizer's own chat format (minus the open assistant header it adds)
    dialog = llama3.encode_dialog(CONVERSATION)
    assert list(e.tokens) == dialog[:len(e.tokens)]
    assert len(dialog) - len(e.tokens) == len(llama3.encode_header("assistant"))
    labelled = [int(t) for t, lab in zip(e.tokens, e.labels) if lab]
    expected = (llama3.encode("4.", bos=False, eos=False) + [llama3.eot_id]
                + llama3.encode("6, of course.", bos=False, eos=False) + [llama3.eot_id])
    assert labelled == expected
    # and they are the *last* tokens of each assistant message, not some other tokens equal
    # to them: each labelled run ends exactly at an <|eot_id|> closing an assistant turn
    runs = np.flatnonzero(np.diff(np.r_[0, e.labels, 0]))
    assert [int(e.tokens[end - 1]) for end in runs[1::2]] == [llama3.eot_id] * 2
    assert llama3.decode(e.tokens[runs[2] - 4:runs[2]]).endswith("assistant<|end_header_id|>\n\n")
    # the response: the last message's content, no header, no end-of-turn
    assert [int(t) for t, r in zip(e.tokens, e.response) if r] == llama3.encode(
        "6, of course.", bos=False, eos=False)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(
        [m["content"] for m in CONVERSATION] * 30 + ["[INST] <<SYS>> <</SYS>> [/INST]"] * 30))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    return tok_lib.load_tokenizer(str(d / "tokenizer.model"))


def test_llama2_labels_are_answers_and_eos(llama2):
    e = chat_data.encode(llama2, CONVERSATION)
    assert list(e.tokens) == llama2.encode_dialog(CONVERSATION + [
        {"role": "user", "content": "x"}])[:len(e.tokens)]
    labelled = llama2.decode([t for t, lab in zip(e.tokens, e.labels) if lab and t != 2])
    assert labelled.replace(" ", "") == "4.6,ofcourse."
    assert [int(t) for t, lab in zip(e.tokens, e.labels) if lab].count(llama2.eos_id) == 2
    assert not e.labels[0] and int(e.tokens[0]) == llama2.bos_id
    assert llama2.decode([t for t, r in zip(e.tokens, e.response) if r]).strip() == \
        "6, of course."


GOOD_PAIR = {"prompt": [{"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}
BAD_SFT = [
    ("not json", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "roles out of order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "unknown role 'robot'"),
]


def test_bad_examples_are_logged_with_file_and_line_and_skipped(tmp_path, caplog):
    good = {"messages": CONVERSATION}
    path = _write(tmp_path / "sft.jsonl", [good] + [b for b, _ in BAD_SFT] + [good])
    with caplog.at_level(logging.WARNING):
        assert chat_data.scan(path, "sft") == 2
    for line, (_, why) in enumerate(BAD_SFT, 2):
        assert sum(f"sft.jsonl:{line}: {why}" in r.getMessage() for r in caplog.records) == 1
    pairs = _write(tmp_path / "pairs.jsonl",
                   [GOOD_PAIR, dict(GOOD_PAIR, rejected=GOOD_PAIR["chosen"])])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert chat_data.scan(pairs, "preference") == 1
    assert "pairs.jsonl:2: chosen and rejected are identical" in caplog.text


def test_all_bad_is_one_sentence(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [b for b, _ in BAD_SFT])
    with pytest.raises(ValueError, match=r"every one of the 4 examples .* is bad \(first: "
                                         r".*bad.jsonl:1: not valid JSON"):
        chat_data.scan(path, "sft")


def _sft_file(tmp_path, n=24):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        words = " ".join(f"w{k}" for k in rng.integers(0, 99, rng.integers(1, 6)))
        if i == 5:
            words = "long " * 80  # longer than any row: cut to seq_len, counted
        lines.append({"messages": [{"role": "user", "content": f"q{i}"},
                                   {"role": "assistant", "content": words}]})
    lines.insert(3, {"messages": [{"role": "user", "content": "no answer"}]})
    return _write(tmp_path / "sft.jsonl", lines), lines


def _config(files, tmp_path, **kw):
    return data.DataConfig(**{**dict(name="chat", files=files, seq_len=64, global_batch=3,
                                     data_dir=str(tmp_path / "tfds")), **kw})


def test_sft_rows_hold_whole_conversations_and_resume_exactly(llama3, tmp_path, caplog):
    files, lines = _sft_file(tmp_path)
    cfg = _config(files, tmp_path)
    encoded = {}
    for obj in lines:
        if chat_data.sft_problem(obj) is None:
            e = chat_data.encode(llama3, obj["messages"]).cut(cfg.seq_len)
            encoded[tuple(int(t) for t in e.tokens)] = e
    it = iter(chat_data.sft_dataset(cfg, llama3, prefetch=0))
    with caplog.at_level(logging.WARNING):
        batches = [next(it) for _ in range(8)]
    assert "1 conversations longer than data.seq_len 64 tokens cut to it so far" in caplog.text
    seen = 0
    for b in batches:
        assert b["inputs"].shape == (3, 64)
        seg = b["segment_ids"]
        for r in range(3):
            for s in range(1, seg[r].max() + 1):
                piece = tuple(int(t) for t in b["inputs"][r][seg[r] == s])
                if seg[r, -1] == s:  # reaches the row's end: its last token may be a target only
                    piece = max(piece, piece + (int(b["targets"][r, -1]),),
                                key=lambda p: p in encoded)
                assert piece in encoded  # whole (or cut to seq_len when longer), never split
                e = encoded[piece]
                # loss_mask: exactly the next token's label, within the conversation
                at = np.flatnonzero(b["segment_ids"][r] == s)
                want = np.r_[e.labels[1:], 0][:len(at)]
                np.testing.assert_array_equal(b["loss_mask"][r, at], want)
                assert np.all(b["positions"][r, at] == np.arange(len(at)))
                seen += 1
        assert not np.any(b["loss_mask"][b["segment_ids"] == 0])
    assert seen >= 40  # about two conversations a row
    # exact resume: a fresh iterator set to the state after 2 batches yields batches 3..6
    it = iter(chat_data.sft_dataset(cfg, llama3, prefetch=0))
    next(it), next(it)
    state = it.get_state()
    again = iter(chat_data.sft_dataset(cfg, llama3, prefetch=0))
    again.set_state(state)
    for want in batches[2:]:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_pack_pairs_gives_each_sequence_its_ids_and_last_token(llama3):
    seqs = []
    for i, n in enumerate([3, 9, 2, 7]):
        pair = {"prompt": [{"role": "user", "content": f"q{i}"}],
                "chosen": [{"role": "assistant", "content": "yes " * n}],
                "rejected": [{"role": "assistant", "content": "no " * (10 - n)}]}
        seqs += chat_data.encode_pair(llama3, pair)
    b = chat_data.pack_pairs(seqs, 40, first_pair=5)
    assert b["inputs"].shape == (8, 40)
    assert (b["segment_ids"].max(axis=1) > 1).any()  # sequences share rows
    for i, e in enumerate(seqs):
        where = b["sequence"] == 10 + i
        assert where.sum() == len(e.tokens)  # whole, in one row
        (row,) = set(np.nonzero(where)[0])
        np.testing.assert_array_equal(b["inputs"][row][where[row]], e.tokens)
        np.testing.assert_array_equal(b["loss_mask"][where], np.r_[e.response[1:], 0])
        assert b["last"][row, np.flatnonzero(where[row])[-1]] == 1
    assert b["last"].sum() == len(seqs) and not b["loss_mask"][b["sequence"] < 0].any()


def test_preference_batches_resume_exactly(llama3, tmp_path):
    lines = [dict(GOOD_PAIR, prompt=[{"role": "user", "content": f"q{i}"}]) for i in range(12)]
    lines.insert(4, dict(GOOD_PAIR, rejected=GOOD_PAIR["chosen"]))  # skipped
    cfg = _config(_write(tmp_path / "p.jsonl", lines), tmp_path, name="pairs", global_batch=2)
    it = iter(chat_data.preference_dataset(cfg, llama3, prefetch=0))
    first = [next(it) for _ in range(4)]
    for b in first:
        assert b["inputs"].shape == (4, 64) and sorted(set(b["sequence"].ravel())) == [-1, 0, 1,
                                                                                      2, 3]
    it = iter(chat_data.preference_dataset(cfg, llama3, prefetch=0))
    next(it)
    again = iter(chat_data.preference_dataset(cfg, llama3, prefetch=0))
    again.set_state(it.get_state())
    for want in first[1:]:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
