"""Params-only export: round trip, dtype on load, placement on a mesh, bad directories."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import checkpoint


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_is_bitwise(tmp_path, tied):
    config = llama_jax.get_config("tiny", tie_embeddings=tied, n_layers=1)
    model = llama_jax.create(config, seed=3)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"\x00tokenizer")
    out = checkpoint.save_params(str(tmp_path / "export"), model, tokenizer_path=str(tok))
    assert checkpoint.is_params_checkpoint(out)
    assert not checkpoint.is_params_checkpoint(str(tmp_path))
    with open(os.path.join(out, "config.json")) as f:
        meta = json.load(f)
    assert meta["format"] == "llama_jax" and meta["model"] == config.to_dict()
    assert open(checkpoint.tokenizer_path(out), "rb").read() == b"\x00tokenizer"
    loaded = checkpoint.load_params(out)
    assert loaded.config == config
    jax.tree.map(np.testing.assert_array_equal, _params(model), _params(loaded))


def test_export_dtype_overwrite_and_no_temp_left(tmp_path):
    model = llama_jax.create(llama_jax.get_config("tiny", n_layers=1))
    path = str(tmp_path / "export")
    checkpoint.save_params(path, model)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_params(path, model)
    checkpoint.save_params(path, model, overwrite=True)
    assert os.listdir(tmp_path) == ["export"]  # the temporary directory was renamed away
    bf16 = checkpoint.load_params(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_params(bf16))} == {jnp.dtype("bfloat16")}
    assert bf16.config.dtype == "bfloat16"


def test_load_params_onto_mesh(tmp_path):
    model = llama_jax.create(llama_jax.get_config("tiny", n_layers=1))
    path = checkpoint.save_params(str(tmp_path / "export"), model)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    loaded = checkpoint.load_params(path, mesh=mesh)
    leaf = jax.tree.leaves(_params(loaded))[0]
    assert leaf.sharding.mesh.shape == mesh.shape


def test_load_params_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a llama_jax params checkpoint"):
        checkpoint.load_params(str(tmp_path))
