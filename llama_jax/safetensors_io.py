"""A small streaming reader and writer for the safetensors format.

Format (huggingface/safetensors, docs "Format"): an 8-byte little-endian header length N, N bytes
of JSON mapping each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets into
the data section that follows the header) plus an optional "__metadata__" dict of strings.

Our own implementation rather than the `safetensors` package: it memory-maps the file so a
tensor is read only when asked for (peak memory near the largest tensor), reads bfloat16 into
numpy through ml_dtypes without torch, and names the file and tensor when a file is truncated.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file; nothing is read until `get`."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header.")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"{path} is truncated: its header claims {n} bytes, the file has "
                                 f"{size - 8}.")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} has a corrupt safetensors header ({e}).") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + n
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
            end = info["data_offsets"][1]
            if self._data_start + end > size:
                raise ValueError(
                    f"{path} is truncated: tensor {name} ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes; re-download or re-convert it.")

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._header[name]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (copy it to keep it).

        Each tensor gets its own mapping, released with the array: one mapping of the whole
        file would keep every page read so far resident (RSS near the file size by the end).
        """
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        if begin == end:  # mmap cannot map zero bytes
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin,
                         shape=shape)


def write(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          get: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors one at a time: `specs` gives each name's shape and dtype up front (the
    header comes first), `get(name)` produces the array when its turn comes."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = dict(dtype=_NAMES[np.dtype(dtype)], shape=list(shape),
                            data_offsets=[offset, offset + nbytes])
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in specs.items():
            arr = np.asarray(get(name))
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {tuple(shape)}.")
            _write_array(f, arr, np.dtype(dtype))
            del arr  # before the next get: one tensor held at a time, not two


def _write_array(f, arr: np.ndarray, dtype: np.dtype, block_bytes: int = 2**20) -> None:
    """Writes arr's bytes as `dtype` in C order, a block of rows at a time: a transposed view
    (our [in, out] as HF's [out, in]) is copied contiguous one block at a time, never whole."""
    if arr.size == 0:  # nothing to write; a [0, D] tensor has no row to size blocks by
        return
    flat = arr.reshape(1, -1) if arr.ndim < 2 else arr
    rows = max(1, block_bytes // max(1, flat[0].size * dtype.itemsize))
    for r in range(0, len(flat), rows):
        block = np.ascontiguousarray(flat[r:r + rows], dtype=dtype)
        f.write(memoryview(block.reshape(-1).view(np.uint8)))  # no bytes copy of the block


class ShardedSafetensors:
    """One view over `model.safetensors` or the shards of `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not os.path.exists(os.path.join(directory, fn)):
                    raise FileNotFoundError(
                        f"{index} lists shard {fn}, which is missing from {directory}.")
            self._files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in files}
            self._where = {}
            for fn, sf in self._files.items():
                for name in sf.keys():
                    self._where[name] = sf
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ValueError(f"{index} maps tensor {missing[0]} to a shard that lacks it.")
        elif os.path.exists(single):
            sf = SafetensorsFile(single)
            self._files = {"model.safetensors": sf}
            self._where = {name: sf for name in sf.keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has neither model.safetensors nor model.safetensors.index.json.")

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def path(self, name: str) -> str:
        """The file that holds tensor `name` (for errors)."""
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
