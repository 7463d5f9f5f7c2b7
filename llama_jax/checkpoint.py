"""Checkpoints: a params-only export for decoding and conversion, and training checkpoints.

Params-only export (stable; `decode.py` and `tools/convert_checkpoint.py` load it):

    DIR/config.json      {"format": "llama_jax", "model": ModelConfig.to_dict()}
    DIR/params/          Orbax StandardCheckpointer save of
                         nnx.to_pure_dict(nnx.state(model, nnx.Param))
    DIR/tokenizer.model  optional copy of the tokenizer file

Training checkpoints (`Manager`) are an Orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`
with items `state` (the TrainState pytree), `data` (the Grain iterator state) and `meta` (model
config and tokenizer name, JSON); the model config and tokenizer are also written once to
`WORKDIR/checkpoints/config.json` and `tokenizer.model`, so a workdir belonging to another model
is refused before anything is compiled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.model import Llama

FORMAT = "llama_jax"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"


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
                tokenizer_path: str | None = None, overwrite: bool = False) -> str:
    """Writes the model's parameters, config and tokenizer to `directory`; returns it.

    `model` is a Llama, or a pure parameter dict (then `config` is required). The files are
    written to a sibling temporary directory and renamed into place, so a reader never sees a
    half-written export.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; pass overwrite=True or choose a new directory.")
    if isinstance(model, Llama):
        config = model.config
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    elif config is None:
        raise ValueError("save_params got a parameter dict without config=; pass the ModelConfig.")
    else:
        params = model
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump({"format": FORMAT, "model": config.to_dict()}, f, indent=2)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


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
