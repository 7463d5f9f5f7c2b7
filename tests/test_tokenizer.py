"""Tokenizers against the references: llama_models' Llama 3 Tokenizer/ChatFormat and sentencepiece.

The Llama 3 tokenizer.model is read from the installed llama_models package (never committed).
"""

import os
import sys

import pytest

from llama_jax import tokenizer as tok

MULTILINGUAL = (
    "The quick brown fox — jumps over 1234567 lazy dogs!\n\n"
    "Größenwahn ist keine Lösung. Ça coûte 3,50 €. ¿Dónde está la biblioteca?\n"
    "Съешь же ещё этих мягких французских булок. 東京は日本の首都です。 북한산 🦙🦙 "
    "مرحبا بالعالم  \t\t  नमस्ते दुनिया\r\n"
    "code: def f(x):\n    return x**2  # it's   we'll I'm THEY'RE\n"
    "literal specials stay text: <|begin_of_text|> <|eot_id|>")
DIALOG = [
    {"role": "system", "content": "You are a terse assistant. Answer in one line."},
    {"role": "user", "content": "Wie spät ist es in Tokio? 今何時?"},
    {"role": "assistant", "content": "Es ist 14:00 Uhr."},
    {"role": "user", "content": "  And in Lima?  "},
]


@pytest.fixture(scope="module")
def meta_tokenizer():
    from llama_models.llama3 import tokenizer as meta_tok
    return meta_tok.Tokenizer.get_instance()


@pytest.fixture(scope="module")
def llama3(meta_tokenizer):
    from llama_models.llama3 import tokenizer as meta_tok
    path = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
    t = tok.load_tokenizer(path)
    assert isinstance(t, tok.Llama3Tokenizer)
    return t


def test_llama3_special_ids(llama3, meta_tokenizer):
    assert llama3.special == meta_tokenizer.special_tokens
    assert (llama3.bos_id, llama3.eos_id, llama3.eot_id) == (128000, 128001, 128009)
    assert llama3.special["<|start_header_id|>"] == 128006
    assert llama3.special["<|reserved_special_token_245|>"] == 128255
    assert llama3.vocab_size == meta_tokenizer.n_words == 128256
    assert llama3.pad_id == meta_tokenizer.pad_id
    assert sorted(llama3.stop_ids) == sorted(meta_tokenizer.stop_tokens)


@pytest.mark.parametrize("bos,eos", [(True, False), (False, True), (False, False)])
def test_llama3_encode_decode_match_meta(llama3, meta_tokenizer, bos, eos):
    ours = llama3.encode(MULTILINGUAL, bos=bos, eos=eos)
    assert ours == meta_tokenizer.encode(MULTILINGUAL, bos=bos, eos=eos)
    assert llama3.decode(ours) == meta_tokenizer.decode(ours)
    plain = llama3.encode(MULTILINGUAL, bos=False, eos=False)
    assert llama3.decode(plain) == MULTILINGUAL
    assert 128000 not in plain  # special-token text is encoded as text


def test_llama3_long_runs_cut_like_meta(llama3, meta_tokenizer):
    # Runs over 25k characters are cut before tiktoken sees them; the cut points change tokens.
    text = "a" * 25_003 + " " * 50_001 + "b" * 7
    assert llama3.encode(text, bos=False, eos=False) == meta_tokenizer.encode(
        text, bos=False, eos=False)


def test_llama3_dialog_matches_chat_format(llama3, meta_tokenizer):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    ref = ChatFormat(meta_tokenizer).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in DIALOG]).tokens
    ours = llama3.encode_dialog(DIALOG)
    assert ours == ref
    assert ours[0] == llama3.bos_id and ours.count(llama3.eot_id) == len(DIALOG)
    assert llama3.decode(ours).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join([MULTILINGUAL, *[m["content"] for m in DIALOG],
                                 "[INST] <<SYS>> <</SYS>> [/INST]"] * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # LLaMA's normalizer_spec: text survives a round trip
        character_coverage=0.98, minloglevel=2)
    return str(d / "tokenizer.model")


def test_sentencepiece_matches_library(sp_model):
    import sentencepiece as spm
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    t = tok.load_tokenizer(os.path.dirname(sp_model))
    assert isinstance(t, tok.SentencePieceTokenizer)
    ids = t.encode(MULTILINGUAL, bos=True, eos=True)
    assert ids == [ref.bos_id()] + ref.encode(MULTILINGUAL) + [ref.eos_id()]
    assert t.decode(ids[1:-1]) == ref.decode(ids[1:-1]) == MULTILINGUAL
    assert (t.vocab_size, t.bos_id, t.eos_id, t.stop_ids) == (400, 1, 2, (2,))


def test_llama2_dialog_structure(sp_model):
    # Meta's llama 2 generation.py: every finished exchange is "<s>[INST] q [/INST] a </s>",
    # the system prompt folds into the first user turn, the last user turn is left open.
    t = tok.load_tokenizer(sp_model)
    ids = t.encode_dialog(DIALOG)
    first = (f"[INST] <<SYS>>\n{DIALOG[0]['content']}\n<</SYS>>\n\n{DIALOG[1]['content']} "
             f"[/INST] {DIALOG[2]['content']} ")
    expected = (t.encode(first, bos=True, eos=True)
                + t.encode("[INST] And in Lima? [/INST]", bos=True, eos=False))
    assert ids == expected
    assert ids.count(t.bos_id) == 2 and ids.count(t.eos_id) == 1 and ids[-1] != t.eos_id
    with pytest.raises(ValueError, match="alternate"):
        t.encode_dialog(DIALOG[:3])


def test_unknown_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        tok.load_tokenizer(str(tmp_path))


def test_byte_tokenizer_is_recorded_with_the_export(tmp_path):
    """"byte" has no file: a byte-level export records the name, and it survives conversion
    Orbax -> Orbax (the README's decode example reads a byte-level run's export)."""
    import llama_jax
    from llama_jax import checkpoint

    from tools import convert_checkpoint  # not tools/ on sys.path: tools/lm_eval.py would hide lm_eval

    byte = tok.load_tokenizer(tok.BYTE)
    text = "déf f(x): → 🦙"
    assert byte.decode(byte.encode(text, bos=True, eos=True)) == text
    assert (byte.vocab_size, byte.stop_ids) == (259, (byte.eos_id,))
    with pytest.raises(ValueError, match="no chat format"):
        byte.encode_dialog(DIALOG)
    model = llama_jax.create(llama_jax.get_config("tiny", vocab_size=259))
    out = checkpoint.save_params(str(tmp_path / "export"), model, tokenizer_path=tok.BYTE)
    assert checkpoint.tokenizer_spec(out) == tok.BYTE
    assert checkpoint.tokenizer_path(out) is None  # no file stands in for it
    converted = convert_checkpoint.convert(out, str(tmp_path / "orbax"), to="orbax")
    assert checkpoint.tokenizer_spec(converted) == tok.BYTE
    assert checkpoint.tokenizer_spec(str(tmp_path)) is None  # not a checkpoint


def test_unreadable_tokenizer_file_is_one_sentence(tmp_path):
    """A tokenizer.model that is neither SentencePiece nor tiktoken is a ValueError naming the
    file (sentencepiece's own error is an INTERNAL RuntimeError); the HF export carries it
    without tokenizer.json instead of failing after the weights are written."""
    from llama_jax import hf_tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a Llama 3"):
        tok.load_tokenizer(str(path))
    assert hf_tokenizer.complete(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
