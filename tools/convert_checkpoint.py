"""Converts LLaMA checkpoints between Meta, Hugging Face and Orbax (llama_jax params) formats.

    python tools/convert_checkpoint.py --input=Meta-Llama-3.1-8B --output=llama3.1-8b --to=orbax
    python tools/convert_checkpoint.py --input=llama3.1-8b --output=hf-out --to=hf --dtype=bf16
    python tools/convert_checkpoint.py --input=hf-out --output=meta-out --to=meta --model_parallel=2

The input format is detected from the directory (`--from` forces it). Every source is read as a
stream of Hugging Face-named tensors in HF layout ([out, in], half-split RoPE), one at a time:
safetensors memory-mapped, .pth through `torch.load(mmap=True)`. Hugging Face and Meta outputs are
written tensor by tensor, so peak memory stays near the largest tensor. Orbax output is the
stacked parameter tree built shard by shard with `jax.make_array_from_callback` (`--mesh`: each
device reads only its own shard, nothing is gathered) and saved by one `StandardCheckpointer`
call, so it holds the model once plus Orbax's write buffers. Output is written to a temporary
sibling directory and renamed into place only when complete.
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


def parse_mesh(spec: str):
    """'data:2,tensor:4' -> a jax Mesh over the first 8 devices."""
    import jax

    try:
        names, sizes = zip(*[(a, int(n)) for a, n in (p.split(":") for p in spec.split(","))])
    except ValueError:
        raise ValueError(f"--mesh={spec!r} is not of the form data:2,tensor:4.") from None
    if set(names) - {"data", "tensor"} or int(np.prod(sizes)) > jax.device_count():
        raise ValueError(f"--mesh={spec!r} needs axes among data, tensor and at most "
                         f"{jax.device_count()} devices (jax.device_count()).")
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=jax.devices()[:int(np.prod(sizes))])


def _sharding(mesh, axes, shape):
    """--mesh places each tensor by sharding.RULES (FSDP over "data", Megatron over "tensor");
    a dimension a mesh axis does not divide is replicated."""
    import jax
    from jax.sharding import NamedSharding

    from llama_jax import sharding

    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, sharding.spec(axes, shape, mesh))


def orbax_arrays(source, c: config_lib.ModelConfig, mesh=None) -> dict:
    """Our parameter tree as jax Arrays placed on `mesh` (default: one device); each device's
    shard is read from the source by itself, so no full array is ever gathered."""
    import jax
    from flax import nnx

    from llama_jax import model as model_lib

    variables = nnx.state(model_lib.abstract(c), nnx.Param)
    dt = meta.np_dtype(c.param_dtype)
    tree: dict = {}

    def place(path, read):
        var = hf._get(variables, path)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jax.make_array_from_callback(
            tuple(var.shape), _sharding(mesh, var.axes, var.shape), read)

    for name, path, _, _, to_ours in hf._global_tensors(c):
        place(path, lambda idx, n=name, f=to_ours: np.asarray(f(source.get(n))[idx], dt))
    for suffix, path, _, _, to_ours in hf._layer_tensors(c):
        def read(idx, suffix=suffix, f=to_ours):
            layers = range(c.n_layers)[idx[0]]
            first = np.asarray(f(source.get(f"model.layers.{layers[0]}.{suffix}"))[idx[1:]], dt)
            out = np.empty((len(layers), *first.shape), dt)
            for j, i in enumerate(layers):  # filled layer by layer: no list of copies
                out[j] = first if j == 0 else f(source.get(f"model.layers.{i}.{suffix}"))[idx[1:]]
            return out
        place(("layers", *path), read)
    return tree


def convert(src: str, dst: str, *, to: str, from_: str | None = None, dtype: str | None = None,
            model_parallel: int = 1, overwrite: bool = False, embedding_split=None,
            mesh: str | None = None) -> str:
    """Converts checkpoint directory `src` to format `to` in `dst`; returns dst."""
    if to not in FORMATS:
        raise ValueError(f"Unknown output format {to!r}; valid: {', '.join(FORMATS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    if model_parallel != 1 and to != "meta":
        raise ValueError("--model_parallel applies to Meta output only (--to=meta).")
    if mesh is not None and to != "orbax":
        raise ValueError("--mesh applies to Orbax output only (--to=orbax).")
    mesh = parse_mesh(mesh) if mesh else None
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; choose another --output "
                              "or pass --overwrite.")
    out_dt = DTYPES.get(dtype)
    source = open_source(src, from_)
    if to == "orbax":
        dt_name = _DTYPE_NAMES[np.dtype(out_dt or source.dtype(source.names[0]))]
        c = source.config.replace(param_dtype=dt_name, dtype=dt_name)
        params = orbax_arrays(source, c, mesh)
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


def benchmark_convert(size_gb: float = 1.0, workdir: str | None = None) -> list[dict]:
    """Rows of MB/s and peak RSS (VmHWM, memory-mapped input pages included) converting a
    random-init bf16 checkpoint of ~size_gb GB HF -> Orbax, HF -> Meta and Meta -> Orbax, each
    in a fresh process. A temporary workdir is deleted afterwards; a given one keeps the input."""
    import subprocess
    import tempfile

    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="bench-convert-")
    d, f, v = 2048, 5632, 32000  # widths D, F of a ~1B model, 32k vocab; layers set the size
    per_layer, fixed = (4 * d * d + 3 * d * f) * 2, 2 * v * d * 2
    c = config_lib.ModelConfig(vocab_size=v, dim=d, n_layers=max(1, round(
        (size_gb * 1e9 - fixed) / per_layer)), n_heads=16, n_kv_heads=16, ffn_dim=f)
    hf_dir = os.path.join(workdir, "hf")
    if not os.path.exists(hf_dir):
        os.makedirs(hf_dir)
        with open(os.path.join(hf_dir, "config.json"), "w") as fh:
            json.dump(config_lib.to_hf_config(c, torch_dtype="bfloat16"), fh)
        rng = np.random.default_rng(0)
        specs = {n: (meta._hf_shape(c, n), DTYPES["bf16"]) for n in hf.tensor_names(c)}
        hf._write_shards(hf_dir, specs, lambda n: (0.02 * rng.standard_normal(
            specs[n][0], np.float32)).astype(DTYPES["bf16"]), 2 * 2**30)
    size_mb = sum(os.path.getsize(os.path.join(hf_dir, x)) for x in os.listdir(hf_dir)) / 1e6
    rows = []
    try:
        for name, src, dst, to in [("hf_to_orbax", "hf", "orbax_from_hf", "orbax"),
                                   ("hf_to_meta", "hf", "meta", "meta"),
                                   ("meta_to_orbax", "meta", "orbax_from_meta", "orbax")]:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--input={os.path.join(workdir, src)}",
                 f"--output={os.path.join(workdir, dst)}", f"--to={to}", "--overwrite",
                 "--report_memory"], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(bench="convert", direction=name, size_mb=round(size_mb, 1),
                             mb_per_s=round(size_mb / r["seconds"], 1),
                             seconds=round(r["seconds"], 2), peak_rss_mb=round(r["peak_rss_mb"])))
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--output", required=True, help="directory to write (must not hold files)")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--from", dest="from_", choices=FORMATS, help="input format (default: detect)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="output dtype (default: as input)")
    p.add_argument("--model_parallel", type=int, default=1, help="Meta output shards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--mesh", help="Orbax output sharded over this mesh, e.g. data:2,tensor:4")
    p.add_argument("--report_memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        convert(a.input, a.output, to=a.to, from_=a.from_, dtype=a.dtype,
                model_parallel=a.model_parallel, overwrite=a.overwrite, mesh=a.mesh)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    if a.report_memory:  # for benchmark_convert: the process's peak resident set
        print(json.dumps(dict(seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())))


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


if __name__ == "__main__":
    main()
