"""Orbax parameter checkpoints written and read one tensor (one layer) at a time.

Orbax's `StandardCheckpointer.save` takes the whole pytree as arrays, so a converter using it
holds the model in host memory plus Orbax's write buffers; its restore likewise returns the whole
tree. Our stacked leaves [L, ...] are L source tensors each, so here TensorStore writes every
leaf as a zarr array chunked by layer (and by mesh shard with a sharding), one layer slice per
call, and reads come back one leaf or one layer slice at a time.

The layout written is the one Orbax 0.12 itself writes with `use_ocdbt=False` (compare
`ocp.PyTreeCheckpointer(use_ocdbt=False).save`): for each leaf a zarr v2 directory named by its
dotted key path (`layers.attn.wq/.zarray`, chunk files `i.j.k`, zstd level 1, no fill value),
`_METADATA` (tree structure, `use_ocdbt: false`), `_sharding` (per leaf, keyed by the base64 of
the name), `array_metadatas/process_0`, `_CHECKPOINT_METADATA` and `commit_success.txt`. Orbax's
restore reads it like one of its own (tests restore it with StandardCheckpointer onto a mesh).
The reader also opens Orbax's default OCDBT layout, as written by `checkpoint.save_params` and
training. One process writes: the converter runs as one; --mesh shards are all addressable.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time

import jax
import numpy as np
import tensorstore as ts
# The `_sharding` entry format; Orbax has no public writer for it (0.12.8).
from orbax.checkpoint._src.metadata import sharding as sharding_metadata

_COMPRESSOR = {"id": "zstd", "level": 1}  # what Orbax writes (tensorstore_utils.py)
# One slice is in flight at a time anyway; fewer TensorStore threads mean fewer malloc arenas
# holding freed chunk buffers (HF -> Orbax RSS measured 8x the largest tensor with the defaults,
# 2x with these limits).
_CONTEXT = ts.Context({"data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 1}})
_HANDLER = ("orbax.checkpoint._src.handlers.standard_checkpoint_handler."
            "StandardCheckpointHandler")


def _name(path: tuple[str, ...]) -> str:
    return ".".join(path)  # Orbax's param name for a dict key path


def _chunks(shard: tuple[int, ...], itemsize: int, stacked: bool, parts: int = 4,
            floor: int = 2**20) -> tuple[int, ...]:
    """The zarr chunk of a leaf: its shard shape, one layer of it when stacked, and the first
    dimension after that split into up to `parts` even pieces while a piece stays over `floor`
    bytes. Reading or writing a chunk holds it compressed and decoded besides the slice
    itself, so quarter chunks keep a layer slice's round trip near 1.5x its size, not 3x."""
    chunks = list(shard)
    if stacked:
        chunks[0] = 1
    axis = 1 if stacked else 0
    if len(chunks) > axis:
        nbytes = int(np.prod(chunks)) * itemsize
        k = max((k for k in range(1, parts + 1)
                 if chunks[axis] % k == 0 and (k == 1 or nbytes // k >= floor)), default=1)
        chunks[axis] //= k
    return tuple(chunks)


class LeafWriter:
    """One leaf: `write(value)` for the whole array, `write(value, layer=i)` for slice i of a
    stacked one. Each distinct shard (replicas skipped) is written as its own chunk(s)."""

    def __init__(self, store, shape, sharding, chunks):
        self.store, self.shape, self.chunks = store, shape, chunks
        regions = {tuple((s.start or 0, s.stop if s.stop is not None else n)
                         for s, n in zip(idx, shape))
                   for idx in sharding.devices_indices_map(shape).values()}
        self.regions = sorted(regions)

    def write(self, value: np.ndarray, layer: int | None = None) -> None:
        expected = self.shape if layer is None else self.shape[1:]
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"{self.store.kvstore.path}: got shape {value.shape}, the leaf "
                             f"needs {tuple(expected)}.")
        chunks = self.chunks if layer is None else self.chunks[1:]
        for region in self.regions:
            if layer is not None and not region[0][0] <= layer < region[0][1]:
                continue
            rest = region if layer is None else region[1:]
            # Chunk by chunk, each copied contiguous and waited on: TensorStore stages a write
            # whole before encoding it, so one call per region held the region twice over.
            for start in itertools.product(*(range(a, b, c) for (a, b), c in zip(rest, chunks))):
                index = tuple(slice(a, min(a + c, b)) for a, c, (_, b) in zip(start, chunks, rest))
                target = self.store[index] if layer is None else self.store[(layer, *index)]
                target.write(np.ascontiguousarray(value[index])).result()


class Writer:
    """`with Writer(directory) as w: w.leaf(path, ...).write(...)`; metadata is written on a
    clean exit, so an interrupted write has no `_METADATA` and Orbax refuses it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.leaves: dict[tuple[str, ...], tuple] = {}
        self.start = time.time_ns()
        os.makedirs(directory, exist_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._finish()
        return False

    def leaf(self, path: tuple[str, ...], shape, dtype, sharding: jax.sharding.Sharding, *,
             stacked: bool = False) -> LeafWriter:
        """Creates the zarr array of one leaf; chunks are the shard shape, split per layer
        when `stacked` (leading L axis)."""
        shape = tuple(int(d) for d in shape)
        chunks = _chunks(tuple(sharding.shard_shape(shape)), np.dtype(dtype).itemsize, stacked)
        store = ts.open({
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(self.directory, _name(path))},
            "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": _COMPRESSOR,
                         "order": "C", "dimension_separator": "."},
        }, create=True, dtype=ts.dtype(jax.numpy.dtype(dtype).name), context=_CONTEXT).result()
        self.leaves[path] = (chunks, sharding)
        return LeafWriter(store, shape, sharding, chunks)

    def _finish(self) -> None:
        tree, shardings, arrays = {}, {}, []
        for path, (chunks, sharding) in sorted(self.leaves.items()):
            name = _name(path)
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: a dict key
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                   "write_shape": list(chunks)}}
            shardings[base64.urlsafe_b64encode(name.encode()).decode()] = (
                sharding_metadata.from_jax_sharding(sharding).to_serialized_string())
            arrays.append({"array_metadata": {"param_name": name, "write_shape": list(chunks),
                                              "chunk_shape": list(chunks), "ext_metadata": None}})
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        self._json("_METADATA", meta)
        self._json("_sharding", shardings)
        os.makedirs(os.path.join(self.directory, "array_metadatas"), exist_ok=True)
        self._json(os.path.join("array_metadatas", "process_0"), {"array_metadatas": arrays})
        self._json("_CHECKPOINT_METADATA", {
            "item_handlers": _HANDLER, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self.start, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {}})
        with open(os.path.join(self.directory, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.directory}")

    def _json(self, name, obj):
        with open(os.path.join(self.directory, name), "w") as f:
            json.dump(obj, f)


class Reader:
    """The leaves of an Orbax pytree checkpoint (ours above or Orbax's OCDBT default), opened
    lazily; `get(path)` reads a whole leaf, `get(path, layer=i)` one slice of a stacked one."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        path = os.path.join(self.directory, "_METADATA")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; {directory} is not a complete Orbax "
                                    "checkpoint (was its save interrupted?).")
        with open(path) as f:
            meta = json.load(f)
        self.ocdbt = meta.get("use_ocdbt", False)
        self.driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self.paths = [tuple(k["key"] for k in v["key_metadata"])
                      for v in meta["tree_metadata"].values()]
        self._open, self._cached = {}, (None, None)

    def _store(self, path: tuple[str, ...]):
        if path not in self._open:
            if path not in self.paths:
                raise KeyError(f"{self.directory} has no parameter {_name(path)}; it holds "
                               f"{sorted(_name(p) for p in self.paths)}.")
            if self.ocdbt:
                kv = {"driver": "ocdbt", "base": f"file://{self.directory}", "path": _name(path)}
            else:
                kv = {"driver": "file", "path": os.path.join(self.directory, _name(path))}
            self._open[path] = ts.open({"driver": self.driver, "kvstore": kv}, read=True,
                                       context=_CONTEXT).result()
        return self._open[path]

    def shape(self, path) -> tuple[int, ...]:
        return tuple(self._store(path).shape)

    def dtype(self, path) -> np.dtype:
        return np.dtype(self._store(path).dtype.numpy_dtype)

    def layers_per_chunk(self, path) -> int:
        """1 for our layer-chunked leaves; L for Orbax's own saves (a chunk per shard)."""
        return int(self._store(path).chunk_layout.read_chunk.shape[0])

    def get(self, path, layer: int | None = None) -> np.ndarray:
        store = self._store(path)
        if layer is None or self.layers_per_chunk(path) == 1:
            return (store if layer is None else store[layer]).read().result()
        # A chunk spans layers: decode the leaf once and serve its layers from it (callers then
        # go leaf by leaf, see `leaf_major`), rather than decode it again for every layer.
        if self._cached[0] != path:
            self._cached = (None, None)  # let go of the previous leaf before reading the next
            self._cached = (path, store.read().result())
        return self._cached[1][layer]

    @property
    def leaf_major(self) -> bool:
        """Whether some stacked leaf must be read whole, so layers are best taken leaf by leaf
        (all of L for one leaf, then the next) instead of layer by layer."""
        return any(p[0] == "layers" and self.layers_per_chunk(p) > 1 for p in self.paths)
