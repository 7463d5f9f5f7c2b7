"""Converts LLaMA checkpoints between Meta, Hugging Face and Orbax (llama_jax params) formats.

    python tools/convert_checkpoint.py --input=Meta-Llama-3.1-8B --output=llama3.1-8b --to=orbax
    python tools/convert_checkpoint.py --input=llama3.1-8b --output=hf-out --to=hf --dtype=bf16
    python tools/convert_checkpoint.py --input=hf-out --output=meta-out --to=meta --model_parallel=2

The input format is detected from the directory (`--from` forces it). Every source is read as a
stream of Hugging Face-named tensors in HF layout ([out, in], half-split RoPE), one at a time:
safetensors memory-mapped, .pth through `torch.load(mmap=True)`. Hugging Face and Meta outputs are
written tensor by tensor, so peak memory stays near the largest tensor; Orbax output is one
`StandardCheckpointer` save of the stacked parameter tree, so it holds the model once. Output is
written to a temporary sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import ml_dtypes
import numpy as np

from llama_jax import checkpoint, hf, io, meta, safetensors_io
from llama_jax import config as config_lib

FORMATS = ("hf", "meta", "orbax")
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype(np.float32)}
_DTYPE_NAMES = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float32): "float32",
                np.dtype(np.float16): "float16"}


class HFReader:
    """A Hugging Face checkpoint directory as a source; names and shapes are checked on open."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; a Hugging Face checkpoint needs it.")
        try:
            self.config = config_lib.load_hf_config(directory)
        except KeyError as e:
            raise ValueError(f"{path} lacks the key {e}; is it a LlamaForCausalLM config?") from None
        self.st = safetensors_io.ShardedSafetensors(directory)
        tok = os.path.join(directory, "tokenizer.model")
        self.tokenizer = tok if os.path.isfile(tok) else None
        c, expected = self.config, set(hf.tensor_names(self.config))
        for name in self.st.keys():
            if name not in expected and not name.endswith(hf._IGNORED_SUFFIXES) and not (
                    c.tie_embeddings and name == "lm_head.weight"):
                raise ValueError(f"{self.where(name)} is unexpected; is this a LlamaForCausalLM "
                                 f"checkpoint matching {path}?")
        for name in hf.tensor_names(c):
            if name not in self.st.keys():
                raise ValueError(f"{directory}: tensor {name} is missing; the checkpoint is "
                                 "incomplete or its config.json is wrong.")
            if self.st.shape(name) != meta._hf_shape(c, name):
                raise ValueError(f"{self.where(name)} has shape {self.st.shape(name)} but {path} "
                                 f"implies {meta._hf_shape(c, name)}; weights and config differ.")

    names = property(lambda self: hf.tensor_names(self.config))

    def where(self, name):
        return f"{self.st._where[name].path}: tensor {name}"

    def shape(self, name):
        return self.st.shape(name)

    def dtype(self, name):
        return self.st._where[name].dtype(name)

    def get(self, name):
        return self.st.get(name)


class ModelSource:
    """An in-memory `Llama` (e.g. restored from an Orbax params checkpoint) as a source."""

    def __init__(self, model, tokenizer=None):
        from flax import nnx

        self.config, self.tokenizer = model.config, tokenizer
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self._get = {}
        for name, path, _, to_hf, _ in hf._global_tensors(self.config):
            self._get[name] = lambda path=path, f=to_hf: f(np.asarray(hf._get(params, path)))
        for i in range(self.config.n_layers):
            for suffix, path, _, to_hf, _ in hf._layer_tensors(self.config):
                self._get[f"model.layers.{i}.{suffix}"] = (
                    lambda path=path, f=to_hf, i=i: f(np.asarray(hf._get(params["layers"], path)[i])))
        self._dtype = np.asarray(params["embed"][:0]).dtype

    names = property(lambda self: hf.tensor_names(self.config))

    def shape(self, name):
        return meta._hf_shape(self.config, name)

    def dtype(self, name):
        return self._dtype

    def where(self, name):
        return f"parameter for {name}"

    def get(self, name):
        return self._get[name]()


def open_source(path: str, fmt: str | None = None):
    fmt = fmt or io.detect_format(path)
    if fmt == "hf":
        return HFReader(path)
    if fmt == "meta":
        return meta.MetaReader(path)
    if fmt == "orbax":
        return ModelSource(checkpoint.load_params(path), checkpoint.tokenizer_path(path))
    raise ValueError(f"Unknown input format {fmt!r}; valid: {', '.join(FORMATS)}.")


def write_hf(directory: str, source, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json, generation_config.json and (sharded) safetensors, tensor by tensor."""
    c = source.config
    specs = {n: (source.shape(n), dtype or source.dtype(n)) for n in hf.tensor_names(c)}
    hf._write_shards(directory, specs, source.get, max_shard_bytes)
    torch_dtype = _DTYPE_NAMES[np.dtype(dtype or source.dtype(hf.tensor_names(c)[0]))]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_lib.to_hf_config(c, torch_dtype=torch_dtype), f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=c.bos_id, eos_token_id=c.eos_id), f, indent=2)


def convert(src: str, dst: str, *, to: str, from_: str | None = None, dtype: str | None = None,
            model_parallel: int = 1, overwrite: bool = False, embedding_split=None) -> str:
    """Converts checkpoint directory `src` to format `to` in `dst`; returns dst."""
    if to not in FORMATS:
        raise ValueError(f"Unknown output format {to!r}; valid: {', '.join(FORMATS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    if model_parallel != 1 and to != "meta":
        raise ValueError("--model_parallel applies to Meta output only (--to=meta).")
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; choose another --output "
                              "or pass --overwrite.")
    out_dt = DTYPES.get(dtype)
    source = open_source(src, from_)
    if to == "orbax":
        dt_name = _DTYPE_NAMES[np.dtype(out_dt or source.dtype(source.names[0]))]
        c = source.config.replace(param_dtype=dt_name, dtype=dt_name)
        params = meta.stack_params(source, c)
        checkpoint.save_params(dst, params, config=c, tokenizer_path=source.tokenizer,
                               overwrite=True)
        return dst
    with hf.atomic_directory(dst, overwrite=overwrite) as tmp:
        if to == "hf":
            write_hf(tmp, source, out_dt)
        else:
            meta.write_meta(tmp, source, model_parallel=model_parallel, dtype=out_dt,
                            embedding_split=embedding_split)
        if source.tokenizer:
            shutil.copyfile(source.tokenizer, os.path.join(tmp, "tokenizer.model"))
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--output", required=True, help="directory to write (must not hold files)")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--from", dest="from_", choices=FORMATS, help="input format (default: detect)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="output dtype (default: as input)")
    p.add_argument("--model_parallel", type=int, default=1, help="Meta output shards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--report_memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        convert(a.input, a.output, to=a.to, from_=a.from_, dtype=a.dtype,
                model_parallel=a.model_parallel, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    if a.report_memory:  # for benchmark_convert: the process's peak resident set
        print(json.dumps(dict(seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())))


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


if __name__ == "__main__":
    main()
