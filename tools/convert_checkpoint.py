"""Converts LLaMA checkpoints between Meta, Hugging Face and Orbax (llama_jax params) formats.

    python tools/convert_checkpoint.py --input=Meta-Llama-3.1-8B --output=llama3.1-8b --to=orbax
    python tools/convert_checkpoint.py --input=llama3.1-8b --output=hf-out --to=hf --dtype=bf16
    python tools/convert_checkpoint.py --input=hf-out --output=meta-out --to=meta --model_parallel=2

The input format is detected from the directory (`--from` forces it). Every source is read as a
stream of Hugging Face-named tensors in HF layout ([out, in], half-split RoPE), one at a time:
safetensors memory-mapped, .pth through `torch.load(mmap=True)`, Orbax one leaf or one layer
slice at a time through TensorStore. Every output is written tensor by tensor: Hugging Face and
Meta files directly, Orbax through `llama_jax.orbax_stream` (each stacked leaf [L, ...] layer by
layer, `--mesh`: as the shards of the target mesh, nothing gathered), so peak memory stays near
the largest tensor (tests/test_convert.py measures under 3x). Tokenizer and generation files
(checkpoint.CARRIED_FILES) travel along, inside the Orbax export too. Output is written to a
temporary sibling directory and renamed into place only when complete; SIGTERM and Ctrl-C
remove it (exit codes 143 and 130), and one left by a killed conversion is removed by the next
conversion to the same output. Plain mistakes end in one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time

import ml_dtypes
import numpy as np

# Run as a script, this repository's llama_jax (beside tools/) comes before an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import checkpoint, cli, hf, io, meta, orbax_stream, safetensors_io  # noqa: E402
from llama_jax import hf_tokenizer  # noqa: E402
from llama_jax import progress  # noqa: E402
from llama_jax import config as config_lib  # noqa: E402
from llama_jax.tokenizer import BYTE  # noqa: E402

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
        self.carried = checkpoint.carried_files(directory)  # tokenizer and generation files
        c, expected = self.config, set(hf.tensor_names(self.config))
        for name in self.st.keys():
            if name not in expected and not name.endswith(hf.IGNORED_SUFFIXES) and not (
                    c.tie_embeddings and name == "lm_head.weight"):
                raise ValueError(f"{self.where(name)} is unexpected; is this a LlamaForCausalLM "
                                 f"checkpoint matching {path}?")
        for name in hf.tensor_names(c):
            if name not in self.st.keys():
                raise ValueError(f"{directory}: tensor {name} is missing; the checkpoint is "
                                 "incomplete or its config.json is wrong.")
            if self.st.shape(name) != hf.tensor_shape(c, name):
                raise ValueError(f"{self.where(name)} has shape {self.st.shape(name)} but {path} "
                                 f"implies {hf.tensor_shape(c, name)}; weights and config differ.")

    names = property(lambda self: hf.tensor_names(self.config))

    def where(self, name):
        return f"{self.st.path(name)}: tensor {name}"

    def shape(self, name):
        return self.st.shape(name)

    def dtype(self, name):
        return self.st.dtype(name)

    def get(self, name):
        return self.st.get(name)


class OrbaxReader:
    """A llama_jax params export as a source, read one leaf (one layer slice) at a time through
    TensorStore; every leaf's shape is checked against the config on open."""

    def __init__(self, directory: str):
        if not checkpoint.is_params_checkpoint(directory):
            raise FileNotFoundError(f"{directory} is not a llama_jax params export (config.json "
                                    "with format llama_jax and params/).")
        self.config = c = checkpoint.load_config(directory)
        self.leaves = orbax_stream.Reader(os.path.join(directory, checkpoint.PARAMS_DIR))
        self.carried = checkpoint.carried_files(directory)
        for name in hf.tensor_names(c):
            path, want = self._leaf(name)[0], _ours_shape(c, name)
            try:
                shape = self.leaves.shape(path)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{self.where(name)} cannot be read ({e}).") from None
            if shape != want:
                raise ValueError(f"{self.where(name)} has shape {shape} but its config.json "
                                 f"implies {want}; weights and config differ.")

    @property
    def names(self) -> list[str]:
        """File order, or leaf by leaf when a leaf is stored in chunks spanning layers (an
        export Orbax saved itself), so each such leaf is decoded once."""
        names = hf.tensor_names(self.config)
        if not self.leaves.leaf_major:
            return names
        return sorted(names, key=lambda n: (n.startswith("model.layers."),
                                            n.split(".", 3)[-1], self._leaf(n)[1] or 0))

    def _leaf(self, name):
        """(leaf path, layer or None, ours -> HF transform) of an HF tensor name."""
        _, path, _, to_hf, _ = hf.spec_of(self.config, name)
        if name.startswith("model.layers."):
            return ("layers", *path), int(name.split(".")[2]), to_hf
        return path, None, to_hf

    def where(self, name):
        return f"{self.leaves.directory}: parameter {'.'.join(self._leaf(name)[0])} ({name})"

    def shape(self, name):
        return hf.tensor_shape(self.config, name)

    def dtype(self, name):
        return self.leaves.dtype(self._leaf(name)[0])

    def get(self, name):
        path, layer, to_hf = self._leaf(name)
        return to_hf(self.leaves.get(path, layer))


def _ours_shape(c, name) -> tuple[int, ...]:
    """Our stacked leaf's shape for an HF tensor name ([L, ...] for a layer tensor)."""
    _, _, hf_shape, _, to_ours = hf.spec_of(c, name)
    shape = to_ours(np.empty(hf_shape, np.int8)).shape
    return (c.n_layers, *shape) if name.startswith("model.layers.") else tuple(shape)


def source_config(path: str, fmt: str | None = None) -> config_lib.ModelConfig:
    """The ModelConfig of a checkpoint directory, from its config file alone (Meta: the
    vocabulary as params.json states it, ties undecided)."""
    fmt = fmt or io.detect_format(path)
    if fmt == "hf":
        return config_lib.load_hf_config(path)
    if fmt == "orbax":
        return checkpoint.load_config(path)
    with open(os.path.join(path, meta.PARAMS_FILE)) as f:
        return config_lib.from_meta_params(json.load(f), vocab_size=0)


def open_source(path: str, fmt: str | None = None):
    fmt = fmt or io.detect_format(path)
    if fmt == "hf":
        return HFReader(path)
    if fmt == "meta":
        return meta.MetaReader(path)
    if fmt == "orbax":
        return OrbaxReader(path)
    raise ValueError(f"Unknown input format {fmt!r}; valid: {', '.join(FORMATS)}.")


def write_hf(directory: str, source, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json, generation_config.json and (sharded) safetensors, tensor by tensor."""
    c = source.config
    specs = {n: (source.shape(n), dtype or source.dtype(n)) for n in source.names}
    hf.write_shards(directory, specs, source.get, max_shard_bytes)
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


def write_orbax(directory: str, source, c: config_lib.ModelConfig, mesh=None) -> None:
    """Our parameter tree as an Orbax pytree checkpoint at `directory`, one source tensor at a
    time: a stacked leaf [L, ...] is written layer by layer, each layer as its mesh shards
    (default: one device), so neither the model nor a whole leaf is ever held."""
    from flax import nnx

    from llama_jax import model as model_lib

    variables = nnx.state(model_lib.abstract(c), nnx.Param)
    dt = meta.np_dtype(c.param_dtype)
    with orbax_stream.Writer(directory) as w:
        for name, path, _, _, to_ours in hf.global_tensors(c):
            var = hf.get_path(variables, path)
            leaf = w.leaf(path, var.shape, dt, _sharding(mesh, var.axes, var.shape))
            leaf.write(np.asarray(to_ours(source.get(name)), dt))
        for suffix, path, _, _, to_ours in hf.layer_tensors(c):
            var = hf.get_path(variables, ("layers", *path))
            leaf = w.leaf(("layers", *path), var.shape, dt, _sharding(mesh, var.axes, var.shape),
                          stacked=True)
            for i in range(c.n_layers):
                leaf.write(np.asarray(to_ours(source.get(f"model.layers.{i}.{suffix}")), dt), i)


def _return_freed_memory() -> None:
    """Makes freed tensor buffers go back to the OS at once. glibc serves allocations under its
    mmap threshold from the heap and raises that threshold (up to 32 MB) each time a larger
    mapping is freed, after which freed tensors stay in the heap: RSS measured 5-8x the largest
    tensor streaming Orbax -> HF. Fixed at 1 MiB (mallopt M_MMAP_THRESHOLD), every tensor-sized
    buffer is its own mapping, unmapped when freed. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def convert(src: str, dst: str, *, to: str, from_: str | None = None, dtype: str | None = None,
            model_parallel: int = 1, overwrite: bool = False, embedding_split=None,
            mesh: str | None = None) -> str:
    """Converts checkpoint directory `src` to format `to` in `dst`; returns dst."""
    check_output(dst, to=to, dtype=dtype, model_parallel=model_parallel, mesh=mesh,
                 overwrite=overwrite)
    _return_freed_memory()
    name = os.path.basename(os.path.normpath(src))
    source = progress.Reading(open_source(src, from_), f"{name} -> {to}")  # bar of bytes read
    try:
        return write(source, dst, to=to, dtype=dtype, model_parallel=model_parallel,
                     embedding_split=embedding_split, mesh=mesh,
                     byte=checkpoint.tokenizer_spec(src) == BYTE, overwrite=overwrite)
    finally:
        source.close()


def check_output(dst: str, *, to: str, dtype: str | None = None, model_parallel: int = 1,
                 mesh: str | None = None, overwrite: bool = False) -> None:
    """One-sentence errors for output options, before any input is read."""
    if to not in FORMATS:
        raise ValueError(f"Unknown output format {to!r}; valid: {', '.join(FORMATS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    if model_parallel != 1 and to != "meta":
        raise ValueError("--model_parallel applies to Meta output only (--to=meta).")
    if mesh is not None and to != "orbax":
        raise ValueError("--mesh applies to Orbax output only (--to=orbax).")
    if mesh:
        parse_mesh(mesh)  # its errors before any input is read
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; choose another --output "
                              "or pass --overwrite.")


def write(source, dst: str, *, to: str, dtype: str | None = None, model_parallel: int = 1,
          embedding_split=None, mesh: str | None = None, byte: bool = False,
          overwrite: bool = False) -> str:
    """Writes a source (HFReader, OrbaxReader, meta.MetaReader or anything with their
    interface) to `dst` in format `to`, tensor by tensor, atomically; `byte`: the tokenizer
    is "byte" (an Orbax export records it). Returns dst."""
    mesh = parse_mesh(mesh) if mesh else None
    out_dt = DTYPES.get(dtype)
    if to == "orbax":
        dt_name = _DTYPE_NAMES[np.dtype(out_dt or source.dtype(source.names[0]))]
        c = source.config.replace(param_dtype=dt_name, dtype=dt_name)
        checkpoint.write_export(dst, c, lambda path: write_orbax(path, source, c, mesh),
                                files=source.carried, overwrite=True,
                                tokenizer=BYTE if byte else None)
        return dst
    with hf.atomic_directory(dst, overwrite=overwrite) as tmp:
        if to == "hf":
            write_hf(tmp, source, out_dt)
            carried = source.carried  # the source's generation_config.json replaces ours
        else:
            meta.write_meta(tmp, source, model_parallel=model_parallel, dtype=out_dt,
                            embedding_split=embedding_split)
            carried = {k: v for k, v in source.carried.items() if k == checkpoint.TOKENIZER_FILE}
        for name, path in carried.items():
            shutil.copyfile(path, os.path.join(tmp, name))
        if to == "hf":  # transformers cannot read a tiktoken tokenizer.model: add tokenizer.json
            hf_tokenizer.complete(tmp, model_max_length=source.config.max_seq_len)
    return dst


def benchmark_convert(size_gb: float = 1.0, workdir: str | None = None) -> list[dict]:
    """Rows of MB/s and peak RSS (VmHWM, memory-mapped input pages included) converting a
    random-init bf16 checkpoint of ~size_gb GB HF -> Orbax, HF -> Meta, Meta -> Orbax and
    Orbax -> HF, each in a fresh process. A temporary workdir is deleted afterwards; a given one
    keeps the input."""
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
        specs = {n: (hf.tensor_shape(c, n), DTYPES["bf16"]) for n in hf.tensor_names(c)}
        hf.write_shards(hf_dir, specs, lambda n: (0.02 * rng.standard_normal(
            specs[n][0], np.float32)).astype(DTYPES["bf16"]), 2 * 2**30)
    size_mb = sum(os.path.getsize(os.path.join(hf_dir, x)) for x in os.listdir(hf_dir)) / 1e6
    rows = []
    try:
        for name, src, dst, to in [("hf_to_orbax", "hf", "orbax_from_hf", "orbax"),
                                   ("hf_to_meta", "hf", "meta", "meta"),
                                   ("meta_to_orbax", "meta", "orbax_from_meta", "orbax"),
                                   ("orbax_to_hf", "orbax_from_hf", "hf_from_orbax", "hf")]:
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
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    cli.call(lambda: convert(a.input, a.output, to=a.to, from_=a.from_, dtype=a.dtype,
                             model_parallel=a.model_parallel, overwrite=a.overwrite,
                             mesh=a.mesh), unwind_on_sigterm=True)
    if a.report_memory:  # for benchmark_convert: the process's peak resident set
        print(json.dumps(dict(seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())))


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


if __name__ == "__main__":
    main()
