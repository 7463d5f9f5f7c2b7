"""The streaming .pth writer against torch.load, and the reader against torch.save."""

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from llama_jax import torch_zip

BF16 = np.dtype(ml_dtypes.bfloat16)


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "layers.0.attention.wq.weight": rng.standard_normal((48, 32), np.float32),
        "tok_embeddings.weight": rng.standard_normal((33, 7)).astype(BF16),  # odd byte counts
        "norm.weight": rng.standard_normal((7,)).astype(np.float16),
        "output.weight": rng.standard_normal((32, 48), np.float32).T,  # a transposed view
    }


def _torch(x):
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("mmap", [False, True])
def test_written_file_is_what_torch_load_reads(tmp_path, mmap):
    """Tensors written in another order than declared come back equal, bit for bit, through
    torch.load, also memory-mapped (which needs every record aligned to 64 bytes)."""
    arrays, path = _arrays(), str(tmp_path / "consolidated.00.pth")
    w = torch_zip.Writer(path, {k: (v.shape, v.dtype) for k, v in arrays.items()})
    for name in reversed(list(arrays)):
        w.write(name, arrays[name])
    w.close()
    state = torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    assert list(state) == list(arrays)  # the declared order
    for k, v in arrays.items():
        assert state[k].shape == v.shape and torch.equal(state[k], _torch(v)), k


def test_reader_gives_what_torch_save_wrote(tmp_path):
    arrays, path = _arrays(), str(tmp_path / "saved.pth")
    torch.save({k: _torch(v) for k, v in arrays.items()}, path)
    state = torch_zip.load(path)
    for k, v in arrays.items():
        got = torch_zip.to_numpy(state[k])
        assert got.dtype == v.dtype and got.tobytes() == np.ascontiguousarray(v).tobytes(), k


def test_writer_refuses_bad_tensors(tmp_path):
    path = str(tmp_path / "x.pth")
    with pytest.raises(ValueError, match="tensor ids has dtype int32; .pth output supports"):
        torch_zip.Writer(path, {"ids": ((3,), np.int32)})
    w = torch_zip.Writer(path, {"a": ((2, 2), np.float32), "b": ((2,), np.float32)})
    with pytest.raises(ValueError, match=r"tensor a has shape \(2, 3\), declared \(2, 2\)"):
        w.write("a", np.zeros((2, 3), np.float32))
    w.write("a", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="tensor b was declared but never written"):
        w.close()


def test_damaged_files_are_named(tmp_path):
    path = str(tmp_path / "t.pth")
    torch.save({k: _torch(v) for k, v in _arrays().items()}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="t.pth cannot be read as a PyTorch checkpoint"):
        torch_zip.load(path)
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ValueError, match="entry step is a int, not a tensor"):
        torch_zip.load(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        torch_zip.load(path)
