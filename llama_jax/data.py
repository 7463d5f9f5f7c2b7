"""Text → packed, sharded, checkpointable training batches (TFDS data source + Grain).

    ds = data.make_dataset(cfg, tokenizer, split="train",
                           process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)                 # grain DatasetIterator: it.get_state() / it.set_state(state)
    batch = next(it)              # dict of numpy [B_local, T]

Pipeline (one Grain graph; no TensorFlow anywhere):
1. `llama_jax/corpus.py` builds the corpus once into array_record (again when its files
   change); its TFDS data source reads it with random access, so the iterator state is a
   handful of integers and resume is exact.
2. Documents are shuffled with `cfg.seed` (a new order each epoch) and repeated forever.
3. The global batch has `global_batch` *lanes*; lane j packs documents j, j+G, j+2G, ... of
   the shuffled stream into rows of T+1 tokens with grain's ConcatThenSplitIterDataset. Process
   p builds only its own lanes [p*B_local, (p+1)*B_local), so it tokenizes only its share, and
   the union over processes is exactly the single-process batch for any process count.
4. Each document is `[BOS] + encode(text) + [EOS]`, as LLaMA trains (its SentencePiece model
   has bos=1, eos=2). A document longer than the row is split; its continuation starts the
   next row of that lane *without* a BOS and with positions restarting at 0 (grain's packer
   does so; RoPE is relative, so only the lost cross-row context matters), and the one target
   that straddles the two rows is not trained on.

Batch fields, all [B_local, T] (T = seq_len): `inputs`, `targets` (inputs shifted by one),
`positions` (0.. within each document piece), `segment_ids` (1, 2, .. per document in a row,
0 = padding) and `loss_mask` (int32 1 where the target is the next token of the same document,
0 across document boundaries and on padding). All int32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import grain
import numpy as np

from llama_jax import corpus
from llama_jax.tokenizer import ByteTokenizer  # noqa: F401 - re-exported (data.ByteTokenizer)


class Tokenizer(Protocol):
    """The interface of llama_jax.tokenizer's tokenizers (`load_tokenizer(path)`)."""
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The fields `make_dataset` reads; an ml_collections ConfigDict with them works too.
    The experiment config's `data` section is built from these fields (llama_jax.experiment)."""
    # "byte" (UTF-8 bytes, 259 ids), a tokenizer.model path, or "train:V" (a V-piece
    # SentencePiece trained on the corpus at the start of a run); train.make_tokenizer reads
    # it, make_dataset takes the tokenizer itself
    tokenizer: str = "byte"
    name: str = "stdlib"       # corpus name (a Python identifier)
    files: str = ""            # glob of .txt/.py/... (one document per file) or .jsonl; "" = stdlib
    jsonl_field: str = "text"  # field of each JSONL object that holds the document
    seq_len: int = 2048        # T: tokens per row fed to the model
    global_batch: int = 8      # rows per step, summed over all processes
    seed: int = 0              # document shuffle seed
    data_dir: str = ""         # TFDS data_dir; "" = ~/.cache/llama_jax/tfds
    shuffle: bool = True       # shuffle the train split (validation is never shuffled)


def check_config(cfg: Any, *, process_count: int = 1, max_seq_len: int | None = None) -> None:
    """One-sentence errors for settings that would fail later, before any data is touched."""
    if cfg.seq_len < 1 or cfg.global_batch < 1:
        raise ValueError(f"seq_len ({cfg.seq_len}) and global_batch ({cfg.global_batch}) must "
                         f"be positive.")
    if max_seq_len is not None and cfg.seq_len > max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {max_seq_len}; "
                         f"lower data.seq_len or raise the model's max_seq_len.")
    if cfg.global_batch % process_count:
        raise ValueError(f"global_batch {cfg.global_batch} is not divisible by the "
                         f"{process_count} processes; make it a multiple of {process_count}.")


def data_source(cfg: Any, split: str):
    """The random-access TFDS source of documents (`{"text": bytes}`), built on first use and
    again whenever the corpus's files change."""
    builder = corpus.prepare(corpus.make_config(cfg.name, cfg.files, cfg.jsonl_field),
                             cfg.data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"no split {split!r}; use one of {sorted(builder.info.splits)}.")
    return builder.as_data_source(split)


def _tokenize(tokenizer: Tokenizer):
    def fn(example):
        text = example["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return {"tokens": np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)}
    return fn


def _shift(rows: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """Stacks packed rows of T+1 tokens into a batch of inputs [B, T] and targets [B, T]."""
    tok = np.stack([r["tokens"] for r in rows]).astype(np.int32)
    seg = np.stack([r["tokens_segment_ids"] for r in rows]).astype(np.int32)
    pos = np.stack([r["tokens_positions"] for r in rows]).astype(np.int32)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    return dict(inputs=tok[:, :-1], targets=tok[:, 1:], positions=pos[:, :-1],
                segment_ids=seg[:, :-1], loss_mask=same_doc.astype(np.int32))


def _lane(docs: grain.MapDataset, j: int, cfg: Any, tokenizer: Tokenizer) -> grain.IterDataset:
    """Row j of every global batch: documents j, j+G, j+2G, ... packed into T+1 tokens."""
    lane = docs[j::cfg.global_batch].map(_tokenize(tokenizer))
    # grain's default ReadOptions start 16 reader threads per lane, hundreds for a large batch;
    # tokenizing holds the GIL anyway, so lanes read synchronously and whole batches are
    # prefetched by one thread in make_dataset.
    lane = lane.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return grain.experimental.ConcatThenSplitIterDataset(
        lane, length_struct={"tokens": cfg.seq_len + 1})


def make_dataset(cfg: Any, tokenizer: Tokenizer, *, split: str = "train",
                 process_index: int = 0, process_count: int = 1,
                 max_seq_len: int | None = None, vocab_size: int | None = None,
                 num_epochs: int | None = None, prefetch: int = 2) -> grain.IterDataset:
    """This process's stream of batches, {field: int32 [global_batch / process_count, T]}.

    max_seq_len / vocab_size: the model's, checked against seq_len and the tokenizer. num_epochs
    None repeats forever (a finite count ends when the first lane runs dry); prefetch > 0
    prepares that many batches in one background thread (close() the iterator when done).
    """
    check_config(cfg, process_count=process_count, max_seq_len=max_seq_len)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{vocab_size}; use the model's tokenizer or raise its vocab_size.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count}).")
    docs = grain.MapDataset.source(data_source(cfg, split))
    if cfg.shuffle and split == "train":
        docs = docs.shuffle(seed=cfg.seed)
    docs = docs.repeat(num_epochs)  # after shuffle: reseeds each epoch (grain RepeatMapDataset)
    per_process = cfg.global_batch // process_count
    first = process_index * per_process
    lanes = [_lane(docs, j, cfg, tokenizer) for j in range(first, first + per_process)]
    ds = grain.experimental.ZipIterDataset(lanes, strict=False).map(_shift)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds
