"""Tokenizers of the LLaMA family behind one interface, with their chat formats.

- LLaMA 1 / 2: a SentencePiece BPE `tokenizer.model` (32,000 pieces; Touvron et al. 2023 §2.1).
- Llama 3.x: a tiktoken-style byte-level BPE `tokenizer.model` (text lines "base64(token) rank",
  128,000 ranks) plus 256 special tokens appended at ids 128000-128255, in the order Meta's
  `llama_models/llama3/tokenizer.py` defines them.
- "byte": UTF-8 bytes after LLaMA's three specials (259 ids), for runs that train no tokenizer;
  it has no file, so a byte-level export records the name instead (checkpoint.tokenizer_spec).

`load_tokenizer(spec)` takes "byte" or a file and tells the two file formats apart from their
contents. Every tokenizer offers `encode(text, *, bos, eos)`, `decode(ids)`,
`encode_dialog(messages)` (not "byte": it has no chat format), and the ids `bos_id`, `eos_id`,
`pad_id`, `stop_ids` and `vocab_size`.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
from typing import Sequence

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": str}

# Llama 3's pre-tokenizer split (`Tokenizer.pat_str` in llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Special tokens of Llama 3.1+ in id order from 128000; the rest of the 256 are reserved.
LLAMA3_SPECIAL = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>")
LLAMA3_NUM_SPECIAL = 256
# tiktoken panics on very long inputs (openai/tiktoken#195); Meta encodes in pieces of at most
# 400k characters, each cut so no run of (non-)whitespace exceeds 25k characters.
_MAX_CHARS, _MAX_RUN = 400_000, 25_000


BYTE = "byte"  # the spec of ByteTokenizer in configs, exports and decode.py --tokenizer


def load_tokenizer(path: str) -> SentencePieceTokenizer | Llama3Tokenizer | ByteTokenizer:
    """The tokenizer of a spec: "byte", or `tokenizer.model` (or a directory holding one),
    whose format is detected from its contents."""
    if path == BYTE:
        return ByteTokenizer()
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No tokenizer file at {path}: pass a tokenizer.model path or "
                                f"{BYTE!r}.")
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    if _is_tiktoken_line(head):
        return Llama3Tokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except RuntimeError as e:  # sentencepiece's "could not parse ModelProto"
        raise ValueError(f"{path} is neither a SentencePiece model nor a Llama 3 tiktoken file "
                         f"(first line {head[:40]!r}); pass the tokenizer.model of the release "
                         f"or 'byte'.") from e


def _is_tiktoken_line(line: bytes) -> bool:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes shifted by 3 after LLaMA's specials: unk/pad 0, BOS 1, EOS 2; vocab 259.
    For tests and corpus-only runs that need no trained tokenizer."""
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    vocab_size: int = 256 + 3

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        raise ValueError("The byte tokenizer has no chat format; drop --chat or use a "
                         "checkpoint with a Llama 2 or Llama 3 tokenizer.")


class SentencePieceTokenizer:
    """LLaMA 1/2 SentencePiece model; chat format of Llama 2 (`generation.py`, chat_completion)."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, path: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA's model defines no pad piece (pad_id -1); padding with EOS keeps ids in range.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """`<s>[INST] user [/INST] answer </s>` per exchange, then the open last user turn.

        A leading system message is folded into the first user turn inside <<SYS>> markers.
        """
        msgs = [dict(m) for m in messages]
        if msgs and msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise ValueError("A Llama 2 dialog needs a user message after the system one.")
            first = self.B_SYS + msgs[0]["content"] + self.E_SYS + msgs[1]["content"]
            msgs = [{"role": msgs[1]["role"], "content": first}] + msgs[2:]
        roles = [m["role"] for m in msgs]
        if len(roles) % 2 == 0 or set(roles[::2]) != {"user"} or set(roles[1::2]) - {"assistant"}:
            raise ValueError(
                f"Llama 2 dialogs alternate user/assistant and end with a user turn; got {roles}.")
        ids = []
        for q, a in zip(msgs[::2], msgs[1::2]):
            text = f"{self.B_INST} {q['content'].strip()} {self.E_INST} {a['content'].strip()} "
            ids += self.encode(text, bos=True, eos=True)
        last = msgs[-1]["content"].strip()
        return ids + self.encode(f"{self.B_INST} {last} {self.E_INST}", bos=True, eos=False)


class Llama3Tokenizer:
    """Llama 3 byte-level BPE through tiktoken; chat format of `llama3/chat_format.py`."""

    def __init__(self, path: str):
        import tiktoken

        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path} line {n} is not 'base64-token rank': {e}.") from e
        names = LLAMA3_SPECIAL + tuple(
            f"<|reserved_special_token_{i}|>"
            for i in range(2, 2 + LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL)))
        self.special = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special)
        self.vocab_size = len(ranks) + len(names)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.eot_id, self.eom_id = self.special["<|eot_id|>"], self.special["<|eom_id|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Text to ids; special-token text in `text` is encoded as plain text."""
        ids = [self.bos_id] * bos
        for piece in _pieces(text):
            ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role  # tool results are the "ipython" role
        return ([self.special["<|start_header_id|>"]] + self.encode(role, bos=False, eos=False)
                + [self.special["<|end_header_id|>"]] + self.encode("\n\n", bos=False, eos=False))

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """<|begin_of_text|>, each message as header + content + <|eot_id|>, then an open
        assistant header for the model to complete."""
        ids = [self.bos_id]
        for m in messages:
            ids += self.encode_header(m["role"]) + self.encode(m["content"], bos=False, eos=False)
            ids.append(self.eot_id)
        return ids + self.encode_header("assistant")


def _pieces(text: str):
    """Cuts text into pieces tiktoken can take, exactly where Meta's tokenizer cuts them."""
    for start in range(0, len(text), _MAX_CHARS):
        chunk, piece_start, offset = text[start:start + _MAX_CHARS], 0, 0
        for _, run in itertools.groupby(chunk, str.isspace):
            run_len = len(list(run))
            for cut in range(_MAX_RUN, run_len, _MAX_RUN):  # cut at run offsets k * 25k
                yield chunk[piece_start:offset + cut]
                piece_start = offset + cut
            offset += run_len
        yield chunk[piece_start:]
