"""Checkpoint tests: params-only export round trip, resume selection, bad workdirs."""

import json
import os
import shutil

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


# ----------------------------------------------------------------------------------------------
# Training checkpoints (Manager): resume selection and refusal of another model's workdir.


def _iterator():
    import grain
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(value):
    return {"w": jnp.full((4,), value, jnp.float32), "step": jnp.int32(value)}


def _manager(workdir, config=None):
    config = config or llama_jax.get_config("tiny")
    return checkpoint.Manager(str(workdir), config, save_every=1, keep=5)


def _save_steps(workdir, steps):
    mgr, it = _manager(workdir), _iterator()
    for step in steps:
        next(it)
        assert mgr.save(step, _state(step), it)
    mgr.close()


def test_manager_restores_latest_with_iterator_state(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    it = _iterator()
    state, step = _manager(tmp_path).restore_latest(jax.eval_shape(lambda: _state(0)), it)
    assert step == 3 and int(state["step"]) == 3
    np.testing.assert_array_equal(state["w"], np.full((4,), 3.0))
    assert next(it) == 3  # three elements were consumed before the save


def test_partially_written_and_broken_steps_are_skipped(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "3.orbax-checkpoint-tmp-1234").mkdir()  # killed mid-save: never renamed
    (ckpt_dir / "3.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"\x00")
    shutil.rmtree(ckpt_dir / "2" / "state")  # step 2 finalized, then its array data lost
    with caplog.at_level("WARNING"):
        state, step = _manager(tmp_path).restore_latest(jax.eval_shape(lambda: _state(0)),
                                                         _iterator())
    assert step == 1 and int(state["step"]) == 1
    text = caplog.text
    assert "3.orbax-checkpoint-tmp-1234 was only partially written" in text
    assert "step 2" in text and "cannot be restored" in text


def test_manager_refuses_workdir_of_another_model(tmp_path):
    _manager(tmp_path).close()
    _manager(tmp_path).close()  # the same model: fine
    other = llama_jax.get_config("tiny", n_layers=3)
    with pytest.raises(ValueError, match=r"holds checkpoints of another model.*n_layers"):
        _manager(tmp_path, other)
    # Execution options (dtype, remat, scan) may change between runs.
    _manager(tmp_path, llama_jax.get_config("tiny", remat="full", dtype="bfloat16")).close()
