"""The safetensors reader and writer against the `safetensors` package, and damaged files."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_jax import safetensors_io

RNG = np.random.default_rng(0)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors():
    """One tensor per supported kind: a transposed (non-contiguous) f32 view of > 1 MiB, so
    the writer's row blocks are exercised; bf16; f16; int32; an empty tensor; a scalar."""
    return {
        "w": RNG.standard_normal((600, 700), np.float32).T,
        "b": RNG.standard_normal((3, 5)).astype(BF16),
        "h": RNG.standard_normal((4,)).astype(np.float16),
        "i": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float32),
    }


def _write(path, tensors, **kw):
    safetensors_io.write(str(path), {k: (v.shape, v.dtype) for k, v in tensors.items()},
                         tensors.__getitem__, **kw)


def _as_torch(x):
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(x, order="C"))  # ascontiguousarray makes a scalar 1-D


def test_our_file_reads_in_the_safetensors_package(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    theirs = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(theirs) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(theirs[k], _as_torch(v)), k
    assert safetensors_io.SafetensorsFile(str(tmp_path / "a.safetensors")).metadata == {
        "format": "pt"}


def test_their_file_reads_here_bit_for_bit(tmp_path):
    tensors = _tensors()
    save_file({k: _as_torch(v) for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    f = safetensors_io.SafetensorsFile(str(tmp_path / "b.safetensors"))
    assert sorted(f.keys()) == sorted(tensors)
    for k, v in tensors.items():
        got = f.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape == f.shape(k), k
        assert got.tobytes() == np.array(v, order="C").tobytes(), k


def test_write_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="x: produced shape"):
        safetensors_io.write(str(tmp_path / "c.safetensors"), {"x": ((2, 2), np.float32)},
                             lambda _: np.zeros((2, 3), np.float32))


def test_truncation_names_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "d.safetensors"
    _write(path, {"first": np.ones(8, np.float32), "last": np.ones(1024, np.float32)})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 16)
    with pytest.raises(ValueError, match=r"d.safetensors is truncated: tensor last ends at byte"):
        safetensors_io.SafetensorsFile(str(path))
    with open(path, "r+b") as f:
        f.truncate(20)  # inside the header
    with pytest.raises(ValueError, match="is truncated: its header claims"):
        safetensors_io.SafetensorsFile(str(path))


def test_sharded_directory_and_its_index(tmp_path):
    _write(tmp_path / "m-1.safetensors", {"a": np.ones(3, np.float32)})
    _write(tmp_path / "m-2.safetensors", {"b": np.full(2, 7, np.int32)})
    index = {"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    json.dump(index, open(tmp_path / "model.safetensors.index.json", "w"))
    st = safetensors_io.ShardedSafetensors(str(tmp_path))
    assert sorted(st.keys()) == ["a", "b"] and st.get("b").tolist() == [7, 7]
    assert st.path("b") == str(tmp_path / "m-2.safetensors") and st.dtype("b") == np.int32

    json.dump(dict(index, weight_map=dict(index["weight_map"], c="m-1.safetensors")),
              open(tmp_path / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="maps tensor c to a shard that lacks it"):
        safetensors_io.ShardedSafetensors(str(tmp_path))
    os.remove(tmp_path / "m-2.safetensors")
    with pytest.raises(FileNotFoundError, match="lists shard m-2.safetensors, which is missing"):
        safetensors_io.ShardedSafetensors(str(tmp_path))
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        safetensors_io.ShardedSafetensors(str(tmp_path))
