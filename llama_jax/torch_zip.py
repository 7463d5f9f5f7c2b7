"""PyTorch `.pth` state dicts, read memory-mapped and written one tensor at a time.

Reading is `torch.load(mmap=True, weights_only=True)`: tensors stay on disk until touched.

Writing is our own, because `torch.save` needs every tensor of the file in memory at once. The
format (torch/serialization.py `_save`, caffe2 `PyTorchStreamWriter`) is an uncompressed zip:
`<archive>/data.pkl` pickles the dict with each tensor as `torch._utils._rebuild_tensor_v2` of
a persistent storage reference ("storage", torch.<T>Storage, key, "cpu", numel), each storage's
raw bytes are the record `<archive>/data/<key>`, its start aligned to 64 bytes (a padding extra
field, id "FB", as PyTorch writes it, so `torch.load(mmap=True)` can map it), plus `version`
and `byteorder` records. Since the pickle needs only shapes, it is written first and the tensor
data follows as it is produced.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_ALIGN = 64
_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
            np.dtype(np.float16): "HalfStorage"}


def load(path: str) -> dict:
    """The state dict of a .pth file, memory-mapped (name -> torch.Tensor)."""
    import torch

    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError variously
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or "
                         "corrupt: re-download or re-convert it.") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name} is a {type(value).__name__}, not a tensor; "
                             "expected a model state dict.")
    return state


def to_numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 through ml_dtypes, which numpy lacks)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch does a contiguous tensor on its own storage."""

    def __init__(self, storage: _StorageRef, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        import torch

        strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, strides, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            import torch

            return ("storage", getattr(torch, _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class Writer:
    """`Writer(path, {name: (shape, dtype)})`, then `write(name, array)` for each name (any
    order), then `close()`. A name never written, or a wrong shape, raises."""

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.path, self.specs = path, {k: (tuple(s), np.dtype(d)) for k, (s, d) in specs.items()}
        for name, (_, dt) in self.specs.items():
            if dt not in _STORAGE:
                raise ValueError(f"{path}: tensor {name} has dtype {dt}; .pth output supports "
                                 "float32, bfloat16 and float16.")
        self.keys = {name: str(i) for i, name in enumerate(self.specs)}
        self.written: set[str] = set()
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.prefix = "consolidated"
        refs = collections.OrderedDict(
            (name, _TensorRef(_StorageRef(self.keys[name], dt, int(np.prod(shape))), shape))
            for name, (shape, dt) in self.specs.items())
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(refs)
        self._record("data.pkl", buf.getvalue())
        self._record("byteorder", b"little")
        self._record("version", b"3\n")

    def _record(self, name: str, data) -> None:
        data = memoryview(data).cast("B")
        info = zipfile.ZipInfo(f"{self.prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type, info.file_size = zipfile.ZIP_STORED, len(data)
        zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then appends a 20-byte extra
        start = self.zf.fp.tell() + 30 + len(info.filename.encode()) + 4 + 20 * zip64
        pad = -start % _ALIGN
        info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        with self.zf.open(info, "w", force_zip64=zip64) as f:
            for i in range(0, len(data), 1 << 26):  # 64 MiB pieces
                f.write(data[i:i + (1 << 26)])

    def write(self, name: str, array: np.ndarray) -> None:
        shape, dt = self.specs[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} has shape {tuple(array.shape)}, "
                             f"declared {shape}.")
        arr = np.ascontiguousarray(array, dtype=dt)
        self._record(f"data/{self.keys[name]}", arr.reshape(-1).view(np.uint8))
        self.written.add(name)

    def close(self, check: bool = True) -> None:
        missing = [k for k in self.specs if k not in self.written]
        self.zf.close()
        if missing and check:
            raise ValueError(f"{self.path}: tensor {missing[0]} was declared but never written.")
