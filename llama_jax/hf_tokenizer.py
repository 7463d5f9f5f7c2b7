"""Hugging Face tokenizer files written from a LLaMA `tokenizer.model`, so that
`transformers.AutoTokenizer` loads an export and encodes exactly as Meta's tokenizer.

`files(path)` returns {file name: JSON value} for tokenizer.json, tokenizer_config.json and
special_tokens_map.json; `write(directory, path)` writes them. Both tokenizer kinds become the
`tokenizers` library's BPE model, written here as plain JSON (no transformers needed to export):

- Llama 3 (tiktoken): byte-level BPE. tiktoken looks a whole pre-token up in its ranks before
  merging (`ignore_merges`), and otherwise merges the adjacent pair whose concatenation has the
  lowest rank; so every split (left, right) of a token into two tokens is a merge, ordered by
  the rank of the token. Tokens are spelled in GPT-2's byte-to-unicode alphabet.
- LLaMA 1/2 (SentencePiece BPE): spaces as "▁" with a dummy prefix, unknown characters as
  <0xNN> byte pieces; SentencePiece merges the pair whose concatenation scores highest, so the
  merges are every split of a piece ordered by its score.

Known differences, as with Hugging Face's own files: special-token text inside a message is a
special token to transformers (Meta encodes it as text), and the chat template tokenizes the
rendered string, so a message that starts with whitespace may merge with the header's "\\n\\n".
"""

from __future__ import annotations

import json
import logging
import os

from llama_jax import tokenizer as tok

TOKENIZER_JSON, CONFIG_JSON, SPECIAL_MAP_JSON = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Meta's chat format (llama_models/llama3/chat_format.py, as tokenizer.encode_dialog): a header
# per message, content untrimmed, <|eot_id|> after each, an open assistant header to complete.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")
# Llama 2's chat format (Meta's generation.py, as tokenizer.SentencePieceTokenizer.encode_dialog).
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = none %}{%- endif %}"
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if loop.first and system is not none %}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + content | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}")


def write(directory: str, path: str, *, model_max_length: int | None = None) -> list[str]:
    """Writes the files of tokenizer.model `path` into `directory`; returns their names."""
    out = files(path, model_max_length=model_max_length)
    _dump(directory, out)
    return list(out)


def _dump(directory: str, out: dict[str, dict]) -> None:
    for name, value in out.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False, indent=2 if name != TOKENIZER_JSON else None)


def complete(directory: str, *, model_max_length: int | None = None) -> list[str]:
    """Adds the Hugging Face files that `directory` lacks beside its tokenizer.model (files
    carried from a Hugging Face source are kept); returns the names written."""
    path = os.path.join(directory, "tokenizer.model")
    if not os.path.isfile(path) or os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
        return []
    try:
        made = files(path, model_max_length=model_max_length)
    except ValueError as e:  # not a tokenizer we read: carried as it is, as before
        logging.warning("%s No Hugging Face tokenizer files written beside it.", e)
        return []
    out = {name: value for name, value in made.items()
           if not os.path.exists(os.path.join(directory, name))}
    _dump(directory, out)
    return list(out)


def files(path: str, *, model_max_length: int | None = None) -> dict[str, dict]:
    """{name: JSON value} of the three Hugging Face files for tokenizer.model `path`."""
    t = tok.load_tokenizer(path)
    if isinstance(t, tok.Llama3Tokenizer):
        model = _llama3_model(t)
        special = {i: name for name, i in t.special.items()}
        pre, norm, decoder = _llama3_pipeline()
        template, eos, unk = LLAMA3_CHAT_TEMPLATE, t.special["<|end_of_text|>"], None
    elif isinstance(t, tok.SentencePieceTokenizer):
        model, special = _sentencepiece_model(t, path)
        pre, norm, decoder = _sentencepiece_pipeline()
        template, eos, unk = LLAMA2_CHAT_TEMPLATE, t.eos_id, model["unk_token"]
    else:
        raise ValueError(f"{path}: only SentencePiece and Llama 3 tokenizer.model files have "
                         "Hugging Face tokenizer files.")
    bos = special[t.bos_id]
    added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False,
                  normalized=False, special=True) for i, s in sorted(special.items())]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": norm, "pre_tokenizer": pre, "post_processor": _prepend_bos(bos, t.bos_id),
        "decoder": decoder, "model": model}
    names = dict(bos_token=bos, eos_token=special[eos], **({"unk_token": unk} if unk else {}))
    config = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
        **names, "chat_template": template, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length or int(1e30),
        "tokenizer_class": "PreTrainedTokenizerFast"}
    if isinstance(t, tok.SentencePieceTokenizer):
        config.update(add_bos_token=True, add_eos_token=False, legacy=True)
    special_map = {k: dict(content=v, lstrip=False, normalized=False, rstrip=False,
                           single_word=False) for k, v in names.items()}
    return {TOKENIZER_JSON: tokenizer_json, CONFIG_JSON: config, SPECIAL_MAP_JSON: special_map}


def _prepend_bos(bos: str, bos_id: int) -> dict:
    """BOS before every encoded text, as Meta's `encode(text, bos=True)` (pairs: before each)."""
    seq = lambda x: {"Sequence": {"id": x, "type_id": 0}}  # noqa: E731
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [special, seq("A")],
            "pair": [special, seq("A"), special, seq("B")],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _bpe(vocab: dict, merges: list, **options) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, **options, "vocab": vocab, "merges": merges}


def _merges(ranked: list[tuple[str, float]], vocab) -> list[list[str]]:
    """[left, right] for every split of every token into two vocabulary tokens, in the order of
    `ranked` (the token's merge priority, best first); splits of one token by left, right id."""
    merges = []
    for token, _ in ranked:
        splits = [(vocab[token[:i]], vocab[token[i:]], token[:i], token[i:])
                  for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [[left, right] for _, _, left, right in sorted(splits)]
    return merges


# ----------------------------------------------------------------------------------------------
# Llama 3: byte-level BPE


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of bytes: printable Latin-1 bytes stand for themselves, the
    other 68 are the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelled = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in spelled]
    spelled.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelled


def _llama3_model(t: tok.Llama3Tokenizer) -> dict:
    alphabet = byte_alphabet()
    ranks = t.model._mergeable_ranks
    vocab = {"".join(alphabet[b] for b in token): rank for token, rank in ranks.items()}
    ranked = sorted(vocab.items(), key=lambda kv: kv[1])
    return _bpe(vocab, _merges(ranked, vocab), ignore_merges=True)


def _llama3_pipeline():
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tok.LLAMA3_PATTERN}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
               "use_regex": True}
    return pre, None, decoder


# ----------------------------------------------------------------------------------------------
# LLaMA 1/2: SentencePiece BPE


def _sentencepiece_model(t: tok.SentencePieceTokenizer, path: str) -> tuple[dict, dict]:
    """The BPE model and {id: special piece} (unknown and control pieces)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != spec.BPE or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        raise ValueError(f"{path}: Hugging Face files are written for LLaMA's SentencePiece "
                         "setting only (BPE, dummy prefix, whitespace kept as is).")
    sp = t.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    special = {i: sp.id_to_piece(i) for i in range(sp.vocab_size())
               if sp.is_control(i) or sp.is_unknown(i)}
    normal = [(p, -sp.get_score(i)) for p, i in vocab.items()
              if not (i in special or sp.is_byte(i) or sp.is_unused(i))]
    normal.sort(key=lambda kv: (kv[1], vocab[kv[0]]))  # highest score first, then id
    unk = sp.id_to_piece(sp.unk_id())
    return _bpe(vocab, _merges(normal, vocab), unk_token=unk, fuse_unk=True,
                byte_fallback=True), special


def _sentencepiece_pipeline():
    # The dummy prefix before every stretch of text, also after a special token (HF's
    # "legacy" form, which is what SentencePiece does for each text Meta encodes separately).
    norm = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return None, norm, decoder
