"""Hugging Face tokenizer files written by hf_tokenizer, loaded by transformers' AutoTokenizer,
against the references: llama_models' Llama 3 Tokenizer/ChatFormat and sentencepiece."""

import json
import os

import pytest

from llama_jax import hf_tokenizer
from llama_jax import tokenizer as tok
from test_tokenizer import DIALOG, MULTILINGUAL

# Text on which a wrong merge order, pre-tokenizer or byte alphabet shows: unicode in several
# scripts, code, runs of spaces/tabs/newlines, digits (split in threes), and control bytes.
TEXTS = [
    MULTILINGUAL.split("literal specials")[0],
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # ok\n\n\n\nclass A:\n    pass\n",
    "   leading and trailing   \t\t\n \r\n\r\n   ",
    "1234567890 3.14159 x=-12e+3;\x00\x07\x7f\u200b\ufeff é e\u0301",
    "ａｂｃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙🧑‍🤝‍🧑 ' 's 'S 'll ''",
]


@pytest.fixture(scope="module")
def meta_llama3():
    from llama_models.llama3 import tokenizer as meta_tok
    return meta_tok.Tokenizer.get_instance()


@pytest.fixture(scope="module")
def hf_llama3(tmp_path_factory, meta_llama3):
    from llama_models.llama3 import tokenizer as meta_tok
    from transformers import AutoTokenizer
    d = str(tmp_path_factory.mktemp("hf_llama3"))
    path = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
    assert sorted(hf_tokenizer.write(d, path)) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    return AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_encodes_as_meta(hf_llama3, meta_llama3, text):
    ids = hf_llama3(text)["input_ids"]
    assert ids == meta_llama3.encode(text, bos=True, eos=False)
    assert hf_llama3.decode(ids[1:]) == text


def test_llama3_special_tokens(hf_llama3, meta_llama3):
    for name, i in meta_llama3.special_tokens.items():
        assert hf_llama3.convert_tokens_to_ids(name) == i
        assert hf_llama3(name, add_special_tokens=False)["input_ids"] == [i]
    assert len(hf_llama3) == meta_llama3.n_words == 128256
    assert (hf_llama3.bos_token_id, hf_llama3.eos_token_id) == (128000, 128001)


def test_llama3_chat_template_as_meta(hf_llama3, meta_llama3):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    ref = ChatFormat(meta_llama3).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in DIALOG]).tokens
    ids = hf_llama3.apply_chat_template(DIALOG, add_generation_prompt=True)["input_ids"]
    assert ids == ref


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("hf_sp")
    (d / "corpus.txt").write_text("\n".join([*TEXTS, *[m["content"] for m in DIALOG]] * 20))
    spm.SentencePieceTrainer.train(  # LLaMA's options (tokenizer_training.py)
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=0.98, minloglevel=2)
    return str(d)


def test_sentencepiece_encodes_as_library(sentencepiece_dir):
    from transformers import AutoTokenizer
    assert hf_tokenizer.complete(sentencepiece_dir)  # tokenizer.json was missing: written
    ours = tok.load_tokenizer(sentencepiece_dir)
    at = AutoTokenizer.from_pretrained(sentencepiece_dir)
    for text in TEXTS + ["x", "日本 zzz ✓✓ 🦙"]:  # characters never seen in training: bytes
        ids = at(text)["input_ids"]
        assert ids == ours.encode(text, bos=True, eos=False)
        assert at.decode(ids, skip_special_tokens=True) == text
    assert at.apply_chat_template(DIALOG, add_generation_prompt=True)["input_ids"] == (
        ours.encode_dialog(DIALOG))
    assert (at.bos_token_id, at.eos_token_id, at.unk_token_id) == (1, 2, 0)


def test_complete_keeps_carried_files(tmp_path, sentencepiece_dir):
    d = tmp_path / "export"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(f"{sentencepiece_dir}/tokenizer.model", "rb").read())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "mine"}))
    assert sorted(hf_tokenizer.complete(str(d))) == ["special_tokens_map.json", "tokenizer.json"]
    assert json.loads((d / "tokenizer_config.json").read_text()) == {"chat_template": "mine"}
    assert hf_tokenizer.complete(str(d)) == []  # tokenizer.json present: nothing to add


def test_byte_tokenizer_has_no_hf_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        hf_tokenizer.files(str(tmp_path / "tokenizer.model"))
    with pytest.raises(ValueError, match="SentencePiece and Llama 3"):
        hf_tokenizer.files(tok.BYTE)
