"""Hugging Face `LlamaForCausalLM` checkpoints: the explicit name map, load and save.

One table (`layer_tensors`, `global_tensors`) names every tensor, where it goes in our
parameter tree and how it is transformed; every tensor's shape is asserted against the config
before it is used. Hugging Face stores `nn.Linear` weights as [out, in]; we store [in, out] with
heads split out (wq [D, N, H]). Both use the half-split RoPE layout, so q/k need no permutation
here (Meta's interleaved layout is handled in `meta.py`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import model as model_lib
from llama_jax import safetensors_io
from llama_jax.config import ModelConfig

# (HF suffix under model.layers.{i}., our path, HF shape, ours -> HF, HF -> ours); shapes and
# transforms are functions of the config (D, N, K, H, F).
_Spec = tuple[str, tuple[str, ...], Callable, Callable, Callable]


def layer_tensors(c: ModelConfig) -> list[_Spec]:
    """The rows of one layer's tensors (suffixes under model.layers.{i}.; our paths under
    the stacked "layers" subtree, without its leading L axis)."""
    d, n, k, h, f = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim

    def heads_in(m):  # [m*H, D] (out, in) <-> [D, m, H]
        return (lambda w: w.T.reshape(d, m, h)), (lambda p: p.reshape(d, m * h).T)

    q_in, q_out = heads_in(n)
    kv_in, kv_out = heads_in(k)
    t = lambda w: w.T  # noqa: E731  [out, in] <-> [in, out]
    same = lambda w: w  # noqa: E731
    return [
        ("input_layernorm.weight", ("attn_norm", "scale"), (d,), same, same),
        ("self_attn.q_proj.weight", ("attn", "wq"), (n * h, d), q_out, q_in),
        ("self_attn.k_proj.weight", ("attn", "wk"), (k * h, d), kv_out, kv_in),
        ("self_attn.v_proj.weight", ("attn", "wv"), (k * h, d), kv_out, kv_in),
        ("self_attn.o_proj.weight", ("attn", "wo"), (d, n * h),
         lambda p: p.reshape(n * h, d).T, lambda w: w.T.reshape(n, h, d)),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), same, same),
        ("mlp.gate_proj.weight", ("mlp", "w_gate"), (f, d), t, t),
        ("mlp.up_proj.weight", ("mlp", "w_up"), (f, d), t, t),
        ("mlp.down_proj.weight", ("mlp", "w_down"), (d, f), t, t),
    ]


def global_tensors(c: ModelConfig) -> list[_Spec]:
    """The rows of the tensors outside the layers (no lm_head when embeddings are tied)."""
    same = lambda w: w  # noqa: E731
    specs = [("model.embed_tokens.weight", ("embed",), (c.vocab_size, c.dim), same, same),
             ("model.norm.weight", ("norm", "scale"), (c.dim,), same, same)]
    if not c.tie_embeddings:
        specs.append(("lm_head.weight", ("lm_head",), (c.vocab_size, c.dim),
                      lambda p: p.T, lambda w: w.T))
    return specs


def tensor_names(c: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint of this config holds, in file order."""
    names = [s[0] for s in global_tensors(c)[:1]]
    for i in range(c.n_layers):
        names += [f"model.layers.{i}.{s[0]}" for s in layer_tensors(c)]
    return names + [s[0] for s in global_tensors(c)[1:]]


# Buffers some older checkpoints carry that are not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def get_path(tree, path):
    """tree[path[0]][path[1]]...: the node at one of the table's parameter paths."""
    for p in path:
        tree = tree[p]
    return tree


def _check_shape(name, where, actual, expected):
    if tuple(actual) != tuple(expected):
        raise ValueError(f"{where}: tensor {name} has shape {tuple(actual)} but config.json "
                         f"implies {tuple(expected)}; the weights and config do not match.")


def read_params(directory: str, c: ModelConfig) -> dict:
    """Reads the safetensors of `directory` into our pure-dict parameter tree (numpy)."""
    st = safetensors_io.ShardedSafetensors(directory)
    expected = set(tensor_names(c))
    unknown = [k for k in st.keys() if k not in expected and not k.endswith(IGNORED_SUFFIXES)
               and not (c.tie_embeddings and k == "lm_head.weight")]
    if unknown:
        raise ValueError(f"{directory}: unexpected tensor {unknown[0]} ({len(unknown)} unknown in "
                         "all); is this a LlamaForCausalLM checkpoint matching its config.json?")
    missing = [k for k in tensor_names(c) if k not in st.keys()]
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]} is missing ({len(missing)} in all); "
                         "the checkpoint is incomplete or its config.json is wrong.")

    for name in tensor_names(c):  # shapes from the headers: fail before reading any data
        _, _, hf_shape, _, _ = spec_of(c, name)
        _check_shape(name, directory, st.shape(name), hf_shape)
    return stack_params(st, c)


def spec_of(c: ModelConfig, name: str) -> _Spec:
    """The table row of HF tensor `name` (model.layers.{i}.* finds its layer row)."""
    if name.startswith("model.layers."):
        suffix = name.split(".", 3)[-1]
        return next(s for s in layer_tensors(c) if s[0] == suffix)
    return next(s for s in global_tensors(c) if s[0] == name)


def tensor_shape(c: ModelConfig, name: str) -> tuple[int, ...]:
    """HF shape of tensor `name`; lm_head.weight has one even when tied (Meta's output.weight)."""
    return tuple(spec_of(c.replace(tie_embeddings=False), name)[2])


def stack_params(source, c: ModelConfig) -> dict:
    """Our pure-dict parameter tree (numpy, c.param_dtype) from any source of HF-named,
    HF-layout tensors (`source.get(name)`): safetensors here, Meta shards in meta.py."""
    dt = np.dtype(jnp.dtype(c.param_dtype))
    params: dict = {"layers": {}}
    for name, path, _, _, to_ours in global_tensors(c):
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.asarray(to_ours(source.get(name)), dtype=dt)
    for suffix, path, hf_shape, _, to_ours in layer_tensors(c):
        shape = to_ours(np.empty(hf_shape, np.int8)).shape
        out = np.empty((c.n_layers, *shape), dt)
        for i in range(c.n_layers):  # filled layer by layer: no list of copies
            out[i] = to_ours(source.get(f"model.layers.{i}.{suffix}"))
        params["layers"].setdefault(path[0], {})[path[1]] = out
    return params


def from_params(c: ModelConfig, params: dict) -> model_lib.Llama:
    """A model whose parameters are the given pure-dict tree (no random init is computed)."""
    abstract = model_lib.abstract(c)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    jax.tree.map(lambda a, p: _check_shape("parameter", "params", p.shape, a.shape), pure, params)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def load_hf(directory: str, **overrides) -> model_lib.Llama:
    """Loads a Hugging Face checkpoint directory; `overrides` replace ModelConfig fields
    (e.g. dtype="bfloat16", scan_layers=False)."""
    c = config_lib.load_hf_config(directory).replace(**overrides)
    return from_params(c, read_params(directory, c))


def save_hf(model: model_lib.Llama, directory: str, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
            tokenizer: str | None = None) -> None:
    """Writes config.json, generation_config.json and (sharded) safetensors, one tensor at a
    time, into a temporary directory that is renamed into place at the end; `tokenizer` (a
    tokenizer.model) is copied in with its Hugging Face files (`hf_tokenizer`)."""
    c = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np_dtype = np.dtype(jnp.dtype(dtype))
    specs, producers = {}, {}
    for name, path, hf_shape, to_hf, _ in global_tensors(c):
        specs[name] = (hf_shape, np_dtype)
        producers[name] = (lambda path=path, f=to_hf: f(np.asarray(get_path(params, path))))
    for i in range(c.n_layers):
        for suffix, path, hf_shape, to_hf, _ in layer_tensors(c):
            name = f"model.layers.{i}.{suffix}"
            specs[name] = (hf_shape, np_dtype)
            producers[name] = (lambda path=path, f=to_hf, i=i:
                               f(np.asarray(get_path(params["layers"], path)[i])))
    ordered = {k: specs[k] for k in tensor_names(c)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_shards(tmp, ordered, lambda k: producers[k](), max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_lib.to_hf_config(c, torch_dtype=dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(dict(bos_token_id=c.bos_id, eos_token_id=c.eos_id), f, indent=2)
        if tokenizer:
            from llama_jax import hf_tokenizer
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
            hf_tokenizer.complete(tmp, model_max_length=c.max_seq_len)


def write_shards(directory, specs, get, max_shard_bytes):
    """model.safetensors, or shards of at most max_shard_bytes and their index, tensor by
    tensor: `specs` {name: (shape, dtype)} in file order, `get(name)` makes each array."""
    shards, current, size = [], {}, 0
    for name, (shape, dt) in specs.items():
        nbytes = int(np.prod(shape)) * dt.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = (shape, dt), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        safetensors_io.write(os.path.join(directory, "model.safetensors"), shards[0], get,
                             metadata={"format": "pt"})
        return
    weight_map = {}
    for j, shard in enumerate(shards):
        fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors_io.write(os.path.join(directory, fn), shard, get, metadata={"format": "pt"})
        weight_map.update({name: fn for name in shard})
    total = sum(int(np.prod(s)) * d.itemsize for s, d in specs.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2)


class atomic_directory:
    """`with atomic_directory(out) as tmp:` writes into tmp, renamed to `out` only on success;
    on failure (any exception: the converter turns SIGTERM into one) nothing is left at `out`
    and tmp is removed. An existing non-empty `out` is refused unless overwrite=True.

    tmp is a hidden sibling `.tmp-<out's name>-<host>-<pid>-<8 hex>`, made with the umask's
    permissions like any new directory (mkdtemp's 0700 would pass to `out`). A process killed
    outright (SIGKILL) leaves its tmp behind: entering removes those of `out` whose process on
    this host has ended, with a warning each.
    """

    def __init__(self, directory: str, *, overwrite: bool = False):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and os.listdir(self.directory) and not overwrite:
            raise FileExistsError(f"{directory} already exists and is not empty; choose another "
                                  "output directory or pass overwrite.")
        self.overwrite = overwrite

    def __enter__(self) -> str:
        os.makedirs(os.path.dirname(self.directory), exist_ok=True)
        remove_stale_tmp_dirs(self.directory)
        prefix = _tmp_prefix(self.directory) + f"{os.getpid()}-"
        while True:
            self.tmp = prefix + secrets.token_hex(4)
            try:
                os.mkdir(self.tmp)  # mode 0o777 less the umask
                return self.tmp
            except FileExistsError:
                continue
            except BaseException:  # a signal raised here, before `with` would call __exit__
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.directory):
            shutil.rmtree(self.directory)
        os.rename(self.tmp, self.directory)
        return False


def _tmp_prefix(directory: str) -> str:
    """The temporary folders of `directory` on this host start with this path."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".tmp-{name}-{socket.gethostname()}-")


def remove_stale_tmp_dirs(directory: str) -> list[str]:
    """Removes the temporary folders of `directory` left by processes of this host that have
    ended (killed mid-write); returns their paths."""
    parent, prefix = os.path.split(_tmp_prefix(directory))
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]{8}")
    removed = []
    for name in sorted(os.listdir(parent)):
        match = pattern.fullmatch(name)
        if match and not _process_alive(int(match.group(1))):
            path = os.path.join(parent, name)
            logging.warning("Removing %s, left by process %s, which ended before finishing "
                            "its output.", path, match.group(1))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
