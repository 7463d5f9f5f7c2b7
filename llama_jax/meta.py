"""Meta's checkpoint format: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Meta's reference (`llama_models/llama3/model.py`, fairscale layers) shards each weight over the
ranks the way its parallel layer computes with it:

- ColumnParallelLinear (wq, wk, wv, w1, w3, output): rows [out] split, dim 0.
- RowParallelLinear (wo, w2): columns [in] split, dim 1.
- Embedding: VocabParallelEmbedding in Llama 3 (dim 0), ParallelEmbedding in LLaMA 1/2 (dim 1).
- Norms: replicated.

Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head; ours and Hugging Face's rotate
half-split pairs (i, i + H/2). `rope_permute` is the one place that converts, on the rows of the
q and k projections (K kv heads for wk, so GQA is handled).

Everything here speaks Hugging Face names and layouts ([out, in] weights, half-split q/k): a
"source" has `config`, `names`, `shape(name)`, `get(name)` and `where(name)` (the file, for
errors). `MetaReader` is such a source; `write_meta` consumes one, one tensor at a time.
"""

from __future__ import annotations

import glob
import json
import os
import re

import ml_dtypes
import numpy as np

from llama_jax import config as config_lib
from llama_jax import hf
from llama_jax import torch_zip
from llama_jax.config import ModelConfig

PARAMS_FILE = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
# Buffers LLaMA 1 checkpoints carry that are not parameters.
_IGNORED = ("rope.freqs",)


def rope_permute(w: np.ndarray, n_heads: int, *, to_half_split: bool) -> np.ndarray:
    """Reorders the rows [n*H] of a q or k projection w [n*H, D] between Meta's interleaved RoPE
    layout (head j rows: re0 im0 re1 im1 ...) and the half-split one (re0 re1 ... im0 im1 ...).

    n_heads is N for wq and K for wk. Same permutation as transformers'
    `convert_llama_weights_to_hf.py` `permute`, and its inverse.
    """
    rows, d = w.shape
    h = rows // n_heads
    src = (n_heads, h // 2, 2, d) if to_half_split else (n_heads, 2, h // 2, d)
    return w.reshape(src).transpose(0, 2, 1, 3).reshape(rows, d)


def tensor_map(c: ModelConfig, embedding_split: int) -> list[tuple[str, str, int | None, int | None]]:
    """(Meta name, HF name, RoPE heads or None, model-parallel split dim or None) per tensor."""
    layer = [
        ("attention.wq.weight", "self_attn.q_proj.weight", c.n_heads, 0),
        ("attention.wk.weight", "self_attn.k_proj.weight", c.n_kv_heads, 0),
        ("attention.wv.weight", "self_attn.v_proj.weight", None, 0),
        ("attention.wo.weight", "self_attn.o_proj.weight", None, 1),
        ("feed_forward.w1.weight", "mlp.gate_proj.weight", None, 0),
        ("feed_forward.w2.weight", "mlp.down_proj.weight", None, 1),
        ("feed_forward.w3.weight", "mlp.up_proj.weight", None, 0),
        ("attention_norm.weight", "input_layernorm.weight", None, None),
        ("ffn_norm.weight", "post_attention_layernorm.weight", None, None),
    ]
    out = [("tok_embeddings.weight", "model.embed_tokens.weight", None, embedding_split)]
    for i in range(c.n_layers):
        out += [(f"layers.{i}.{m}", f"model.layers.{i}.{h}", r, s) for m, h, r, s in layer]
    # Meta always stores output.weight; a tied model writes its embedding there.
    head = "model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
    return out + [("norm.weight", "model.norm.weight", None, None), ("output.weight", head, None, 0)]


def tokenizer_file(directory: str) -> str | None:
    """The tokenizer.model of a Meta checkpoint directory: beside params.json, or one level up,
    where Meta's LLaMA 1/2 releases keep the one tokenizer all sizes share (llama-2-7b/,
    llama-2-13b/, ..., tokenizer.model)."""
    for d in (directory, os.path.dirname(os.path.abspath(directory))):
        path = os.path.join(d, "tokenizer.model")
        if os.path.isfile(path):
            return path
    return None


def default_embedding_split(c: ModelConfig) -> int:
    """Llama 3's reference splits the embedding over the vocabulary, LLaMA 1/2's over D."""
    return 0 if c.vocab_size >= 128000 else 1


def shard_shape(shape, split: int | None, n: int) -> tuple[int, ...]:
    return tuple(d // n if i == split else d for i, d in enumerate(shape))


# ----------------------------------------------------------------------------------------------
# Reading


class MetaReader:
    """A Meta checkpoint directory as a source of Hugging Face-layout tensors (model-parallel
    shards merged, RoPE rows permuted). Names, shapes and files are all checked on open."""

    def __init__(self, directory: str):
        self.directory = directory
        params_path = os.path.join(directory, PARAMS_FILE)
        if not os.path.isfile(params_path):
            raise FileNotFoundError(f"{params_path} is missing; a Meta checkpoint needs params.json.")
        files = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
        ranks = [int(_SHARD.search(f).group(1)) for f in files if _SHARD.search(f)]
        if not files or ranks != list(range(len(files))):
            raise FileNotFoundError(
                f"{directory} needs consolidated.00.pth ... consolidated.NN.pth with no gaps; "
                f"found {[os.path.basename(f) for f in files]}.")
        with open(params_path) as f:
            params = json.load(f)
        self.tokenizer = tokenizer_file(directory)
        self.carried = {"tokenizer.model": self.tokenizer} if self.tokenizer else {}
        self.files = files
        # Shapes and dtypes only: each `get` maps the files afresh and lets go of them, since a
        # mapping kept open would keep every page read so far resident.
        self.shards = [{k: (tuple(t.shape), torch_zip.to_numpy(t.reshape(-1)[:0]).dtype)
                        for k, t in torch_zip.load(f).items()} for f in files]
        vocab = None
        if params.get("vocab_size", -1) <= 0:  # LLaMA 1 and 2 write -1: the weights decide
            vocab = self._embedding_rows(params["dim"])
        self.config = config_lib.from_meta_params(params, vocab_size=vocab)
        self._check(params_path)
        # params.json has no tying field; an export that adds one is believed but checked.
        hint = params.get("tie_word_embeddings", params.get("tie_embeddings"))
        if hint is not False and self._output_is_embedding():
            self.config = self.config.replace(tie_embeddings=True)
        elif hint:
            raise ValueError(f"{params_path} says the embeddings are tied but output.weight "
                             "differs from tok_embeddings.weight; remove the key or fix the weights.")

    def _embedding_rows(self, dim: int) -> int:
        """V of tok_embeddings.weight [V, D], whichever way the ranks split it: over D
        (ParallelEmbedding, LLaMA 1/2) each shard is [V, D/n], over V each is [V/n, D]."""
        name = "tok_embeddings.weight"
        shape = self.shards[0].get(name, (None,))[0]
        if shape is None or len(shape) != 2:
            raise ValueError(f"{self.files[0]}: tensor {name} is missing or not 2-D, and "
                             "params.json has vocab_size -1; the checkpoint is incomplete.")
        rows, cols = shape
        return rows * len(self.files) if cols == dim else rows

    def _check(self, params_path):
        c, n = self.config, len(self.files)
        first = self.shards[0].get("tok_embeddings.weight", (None,))[0]
        self.embedding_split = default_embedding_split(c)
        if first is not None and n > 1:  # tell VocabParallel from Parallel embedding by shape
            self.embedding_split = 0 if first == (c.vocab_size // n, c.dim) else 1
        self.map = {hf_name: (meta, rope, split) for meta, hf_name, rope, split
                    in tensor_map(c, self.embedding_split)}
        expected = {meta for meta, _, _ in self.map.values()}
        for f, shard in zip(self.files, self.shards):
            unknown = [k for k in shard if k not in expected and k not in _IGNORED]
            if unknown:
                raise ValueError(f"{f}: unexpected tensor {unknown[0]}; is this a Llama checkpoint "
                                 "matching params.json?")
            for hf_name, (meta, _, split) in self.map.items():
                if meta not in shard:
                    raise ValueError(f"{f}: tensor {meta} is missing; the checkpoint is incomplete.")
                want = shard_shape(hf.tensor_shape(c, hf_name), split, n)
                if shard[meta][0] != want:
                    raise ValueError(
                        f"{f}: tensor {meta} has shape {shard[meta][0]} but {params_path} "
                        f"with {n} model-parallel shard(s) implies {want}; weights and params.json "
                        "do not match.")

    def _output_is_embedding(self, rows: int = 1024) -> bool:
        """Meta's model always has its own output.weight; Llama 3.2 1B/3B tie it to the
        embedding and store a copy there. Bit-equal copies mean tied. Compared shard by shard
        in blocks of rows when both are split alike, so little is held at once."""
        (e, _, se), (o, _, so) = self.map["model.embed_tokens.weight"], self.map["lm_head.weight"]
        if se != so and len(self.files) > 1:  # split unlike (LLaMA 1/2): merged copies
            a, b = self.get("model.embed_tokens.weight"), self.get("lm_head.weight")
            return a.tobytes() == b.tobytes()
        for f in self.files:
            shard = torch_zip.load(f)
            a, b = torch_zip.to_numpy(shard[e]), torch_zip.to_numpy(shard[o])
            if any(a[r:r + rows].tobytes() != b[r:r + rows].tobytes()
                   for r in range(0, len(a), rows)):
                return False
        return True

    @property
    def names(self) -> list[str]:
        return hf.tensor_names(self.config)

    def shape(self, name: str) -> tuple[int, ...]:
        return hf.tensor_shape(self.config, name)

    def where(self, name: str) -> str:
        return f"{self.files[0]} ({len(self.files)} shards): tensor {self.map[name][0]}"

    def dtype(self, name: str) -> np.dtype:
        return self.shards[0][self.map[name][0]][1]

    def get(self, name: str) -> np.ndarray:
        meta, rope, split = self.map[name]
        if split is None or len(self.files) == 1:
            w = torch_zip.to_numpy(torch_zip.load(self.files[0])[meta])  # unmapped once dropped
        else:
            w = np.concatenate([torch_zip.to_numpy(torch_zip.load(f)[meta]) for f in self.files],
                               axis=split)
        return rope_permute(w, rope, to_half_split=True) if rope else w


# ----------------------------------------------------------------------------------------------
# Writing


def write_meta(directory: str, source, *, model_parallel: int = 1, dtype=None,
               embedding_split: int | None = None) -> None:
    """Writes params.json and consolidated.NN.pth (one per rank) into `directory` (which must
    exist), each tensor read from `source` once and written to every rank's file."""
    c, n = source.config, model_parallel
    split_e = default_embedding_split(c) if embedding_split is None else embedding_split
    table = tensor_map(c, split_e)
    for meta, hf_name, _, split in table:
        shape = hf.tensor_shape(c, hf_name)
        if split is not None and shape[split] % n:
            raise ValueError(f"Cannot split tensor {meta} {shape} over {n} model-parallel ranks: "
                             f"dim {split} is not divisible; choose a --model_parallel dividing it.")
    if c.n_kv_heads % n:
        raise ValueError(f"{c.n_kv_heads} kv heads cannot be split over {n} ranks; Meta's "
                         "reference gives every rank whole kv heads.")
    params = config_lib.to_meta_params(c)  # raises early if params.json cannot express c
    out_dt = None if dtype is None else np.dtype(dtype)
    dt_of = lambda name: out_dt or source.dtype(name)  # noqa: E731
    writers = [torch_zip.Writer(os.path.join(directory, f"consolidated.{r:02d}.pth"),
                                {m: (shard_shape(hf.tensor_shape(c, h), s, n), dt_of(h))
                                 for m, h, _, s in table}) for r in range(n)]
    order = {name: i for i, name in enumerate(source.names)}  # the order the source reads best
    try:
        for meta, hf_name, rope, split in sorted(table, key=lambda t: order[t[1]]):
            w = np.asarray(source.get(hf_name), dtype=dt_of(hf_name))
            if rope:
                w = rope_permute(w, rope, to_half_split=False)
            parts = [w] * n if split is None else np.split(w, n, axis=split)
            for writer, part in zip(writers, parts):
                writer.write(meta, part)
            del w, parts
    except BaseException:
        for writer in writers:
            writer.close(check=False)
        raise
    for writer in writers:
        writer.close()
    with open(os.path.join(directory, PARAMS_FILE), "w") as f:
        json.dump(params, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Loading into a model


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def load_meta(directory: str, **overrides):
    """A Meta checkpoint directory as a `Llama`; `overrides` replace ModelConfig fields."""
    reader = MetaReader(directory)
    c = reader.config.replace(**overrides)
    return hf.from_params(c, hf.stack_params(reader, c))
