"""Checkpoints: the params-only export for decoding and conversion.

Params-only export (stable; `decode.py` and `tools/convert_checkpoint.py` load it):

    DIR/config.json      {"format": "llama_jax", "model": ModelConfig.to_dict()}, plus
                         "tokenizer": "byte" for a byte-level run (no tokenizer file)
    DIR/params/          Orbax StandardCheckpointer save of
                         nnx.to_pure_dict(nnx.state(model, nnx.Param)); the converter writes
                         the same pytree in Orbax's non-OCDBT layout, chunked by layer
                         (`orbax_stream`), which Orbax restores alike
    DIR/tokenizer.model  optional copy of the tokenizer file
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json
                         optional, carried from a Hugging Face checkpoint by the converter

Training checkpoints (steps with optimizer and data-iterator state) are
`llama_jax.train_checkpoint`; their directory also holds a config.json in this format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.model import Llama
from llama_jax.tokenizer import BYTE

FORMAT = "llama_jax"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
# Files a params export carries beside config.json so that conversion back to Hugging Face
# gives them out again: the tokenizer (SentencePiece/tiktoken model, or HF's fast-tokenizer
# files) and the generation defaults.
CARRIED_FILES = (TOKENIZER_FILE, "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")


# ----------------------------------------------------------------------------------------------
# Params-only export


def is_params_checkpoint(directory: str) -> bool:
    """True if `directory` holds a complete params-only export written by `save_params`."""
    path = os.path.join(directory, CONFIG_FILE)
    if not (os.path.isfile(path) and os.path.isdir(os.path.join(directory, PARAMS_DIR))):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_params(directory: str, model: Llama | dict, *, config: ModelConfig | None = None,
                tokenizer_path: str | None = None, overwrite: bool = False,
                files: dict[str, str] | None = None, extra: dict | None = None) -> str:
    """Writes the model's parameters, config and tokenizer to `directory`; returns it.

    `model` is a Llama, or a pure parameter dict (then `config` is required; `extra` adds keys
    to config.json, e.g. a reward model's "kind"). `tokenizer_path`
    is a tokenizer file to copy in, or "byte" (recorded in config.json). `files` maps
    names of CARRIED_FILES to paths copied in beside config.json. The files are written to a
    sibling temporary directory and renamed into place, so a reader never sees a half-written
    export.
    """
    if isinstance(model, Llama):
        config = model.config
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    elif config is None:
        raise ValueError("save_params got a parameter dict without config=; pass the ModelConfig.")
    else:
        params = model

    def write(path):
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params)
            ckptr.wait_until_finished()

    byte = tokenizer_path == BYTE
    if tokenizer_path and not byte:
        files = dict(files or {}, **{TOKENIZER_FILE: tokenizer_path})
    return write_export(directory, config, write, files=files, overwrite=overwrite,
                        tokenizer=BYTE if byte else None, extra=extra)


def write_export(directory: str, config: ModelConfig, write_params, *,
                 files: dict[str, str] | None = None, overwrite: bool = False,
                 tokenizer: str | None = None, extra: dict | None = None) -> str:
    """The params-only export around `write_params(path)`, which writes the Orbax pytree at
    `path` (collectively, on every process): config.json (with `tokenizer`, a spec of a
    tokenizer that has no file, if given; and the keys of `extra`, e.g. a reward model's
    "kind") and the carried files beside it, all in a temporary directory renamed into place
    at the end."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; pass overwrite=True or choose a new directory.")
    unknown = sorted(set(files or {}) - set(CARRIED_FILES))
    if unknown:
        raise ValueError(f"Cannot carry {unknown[0]} in a params export; valid: {CARRIED_FILES}.")
    # One temporary name for all processes: the Orbax save is collective (each process
    # writes its own shards); process 0 alone writes the small files and renames.
    tmp, primary = f"{directory}.tmp", jax.process_index() == 0
    try:  # from its creation on, tmp goes on any exception (a SIGTERM the converter raises)
        if primary:
            if os.path.exists(tmp):
                logging.warning("Removing %s, left by an export that was killed.", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier("save_params:start")
        write_params(os.path.join(tmp, PARAMS_DIR))
        if primary:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump({"format": FORMAT, "model": config.to_dict(),
                           **({"tokenizer": tokenizer} if tokenizer else {}), **(extra or {})},
                          f, indent=2)
            for name, path in (files or {}).items():
                shutil.copyfile(path, os.path.join(tmp, name))
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.rename(tmp, directory)
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier("save_params:end")
    return directory


def carried_files(directory: str, names=None) -> dict[str, str]:
    """{name: path} of the CARRIED_FILES (or `names`) present in `directory`."""
    names = CARRIED_FILES if names is None else names
    return {n: os.path.join(directory, n) for n in names
            if os.path.isfile(os.path.join(directory, n))}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def load_config(directory: str) -> ModelConfig:
    """The ModelConfig stored in a params-only export (or a training checkpoint directory)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; is {directory} a llama_jax checkpoint?")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a llama_jax config (format {meta.get('format')!r}).")
    return ModelConfig.from_dict(meta["model"])


def tokenizer_path(directory: str) -> str | None:
    """The tokenizer file stored with a checkpoint, or None."""
    path = os.path.join(directory, TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


def load_tokenizer(directory: str, override: str = ""):
    """The tokenizer a launcher decodes `directory` with: `override` (a tokenizer.model path or
    "byte") if given, else the checkpoint's own (beside the weights, above a Meta directory, or
    recorded by a params export); None if it has none."""
    from llama_jax import io, tokenizer

    if override:
        if override != BYTE and not os.path.exists(override):
            raise FileNotFoundError(f"--tokenizer={override} does not exist; pass a "
                                    f"tokenizer.model file or --tokenizer=byte.")
        return tokenizer.load_tokenizer(override)
    spec = io.tokenizer_file(directory) or tokenizer_spec(directory)
    return tokenizer.load_tokenizer(spec) if spec else None


def tokenizer_spec(directory: str) -> str | None:
    """What `tokenizer.load_tokenizer` needs for a checkpoint's tokenizer: its file, "byte"
    where a params export records the byte tokenizer, or None."""
    path, config = tokenizer_path(directory), os.path.join(directory, CONFIG_FILE)
    if path or not is_params_checkpoint(directory):
        return path
    with open(config) as f:
        return json.load(f).get("tokenizer")


def load_params(directory: str, *, dtype=None, shardings=None, mesh=None,
                config: ModelConfig | None = None) -> Llama:
    """Restores a `save_params` export into a Llama.

    dtype: parameter and compute dtype (e.g. "bfloat16"); default: as saved.
    shardings: a pytree of jax.sharding.Sharding matching the parameter dict, or one Sharding
      for every parameter; mesh: replicate every parameter over this mesh. Default: the first
      local device.
    config: override execution options (remat, scan) — its arch() must equal the saved one.
    """
    if not is_params_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not a llama_jax params checkpoint (no config.json with format "
            f"{FORMAT!r} and params/); write one with llama_jax.checkpoint.save_params.")
    saved = load_config(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        kind = json.load(f).get("kind")
    if kind:  # llama_jax.reward's export: another parameter tree than a Llama's
        raise ValueError(f"{directory} holds a {kind} model, not a language model; load it "
                         f"with llama_jax.{kind}.load.")
    if config is not None and config.arch() != saved.arch():
        raise ValueError(f"config {config.name!r} does not match the checkpoint's architecture "
                         f"{saved.arch()}; use the saved config.")
    config = config or saved
    if dtype is not None:
        dtype = jnp.dtype(dtype).name
        config = config.replace(param_dtype=dtype, dtype=dtype)
    abstract_model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract_model)
    target = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    target = _with_shardings(target, shardings, mesh)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
    param_state = nnx.state(abstract_model, nnx.Param)
    nnx.replace_by_pure_dict(param_state, params)
    model = nnx.merge(graphdef, state)
    nnx.update(model, param_state)
    return model


def _with_shardings(target, shardings, mesh):
    """ShapeDtypeStructs of `target` with the requested shardings attached."""
    if shardings is None:
        if mesh is not None:
            shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            target)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        target, shardings)
