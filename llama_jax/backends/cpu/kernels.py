"""CPU kernels through jax.ffi, built on first use: for decode steps a whole transformer block
per call (`decode_layer`) and the few-row product of the output head (`matmul`); for bf16
training steps the self-attention forward and backward (`attention_forward`,
`attention_backward`; csrc/attention.cc, used by attention.materialized_attention); for
training steps the AdamW update of a parameter in place (`adamw`; csrc/adamw.cc, used by
optim.fused_update) and SwiGLU's elementwise part (`swiglu_forward`, `swiglu_backward`;
csrc/swiglu.cc, used by dense.swiglu).

XLA:CPU runs a decode step slowly: a batch-1 product on one Eigen thread, 2-8 rows through
YNNPACK re-packing the weights every call, bf16 dots converting their weights to f32 first, the
KV-cache write as a loop rewriting the whole stacked cache, and ~20 small operations per layer,
each waking the thread pool. `csrc/decode.cc` reads weights packed once into 32-column tiles
([N/32, K, 32], `Packed`), f32 or bf16, with the rows' accumulators in AVX-512 registers and f32
accumulation, and DecodeLayer does a block's norms, RoPE, cache write, attention and SwiGLU in
the same call, its phases shared between the caller and a helper from XLA's own intra-op pool
(an OpenMP team fought that pool for the two cores). Measured speeds: BENCHMARKS.md.

Each library is compiled with the system C++ compiler (`$CXX`, else g++ / c++) against the
XLA FFI headers shipped with jaxlib, with -march=native, into
~/.cache/llama_jax/kernels/<hash of sources, flags, jaxlib, CPU>/ (written atomically), once
per machine. Without a compiler, when the build fails, on a non-CPU default backend, or with
LLAMA_JAX_CPU_KERNELS=0, `available()` (`attention_available()`) is False and decoding
(attention) keeps XLA's operations. The attention kernel also needs AVX-512 BF16 (and uses AMX
where the CPU has it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TILE = 32  # output columns per packed tile (kernels/decode.cc: kTile)
MAX_ROWS = 8  # rows the kernels keep in registers per pass over the weights (more: 8 at a time)
# Prefills of up to this many tokens (batch x prompt) use the product kernel too; longer ones
# XLA's dot on an unpacked copy of the weights (the crossover measured in BENCHMARKS.md).
PREFILL_ROWS = 128
ENV = "LLAMA_JAX_CPU_KERNELS"
_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCE = os.path.join(_KERNELS, "decode.cc")
_ATTENTION_SOURCE = os.path.join(_KERNELS, "attention.cc")
_ADAMW_SOURCE = os.path.join(_KERNELS, "adamw.cc")
_SWIGLU_SOURCE = os.path.join(_KERNELS, "swiglu.cc")
_HEADERS = (os.path.join(_KERNELS, "team.h"),)
_TARGET = "llama_jax_small_matmul"
_LAYER_TARGET = "llama_jax_decode_layer"
_ATTENTION_FORWARD = "llama_jax_attention_forward"
_ATTENTION_BACKWARD = "llama_jax_attention_backward"
_ADAMW = "llama_jax_adamw"
_SWIGLU_FORWARD = "llama_jax_swiglu_forward"
_SWIGLU_BACKWARD = "llama_jax_swiglu_backward"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17")
# Added for one source: AdamW rounds every product as XLA does (no contraction into FMAs) and
# lets its plain loop vectorise (no errno from sqrt; 512-bit vectors where the CPU has them).
_SOURCE_FLAGS = {"adamw.cc": ("-ffp-contract=off", "-fno-math-errno",
                              "-mprefer-vector-width=512")}


def _cpu_signature() -> str:
    """The CPU model and feature flags (-march=native code is valid only where they match)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(flags: tuple[str, ...] = _FLAGS, source: str = _SOURCE) -> str | None:
    """Path of the library compiled from `source` (built if missing), or None with a logged
    reason. flags: the compiler flags (tests build the portable C++ path with -mno-avx512f)."""
    what = os.path.basename(source)[:-len(".cc")]
    flags = (*flags, *_SOURCE_FLAGS.get(os.path.basename(source), ()))
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        logging.warning("llama_jax: no C++ compiler found; the CPU %s kernel is off (XLA's "
                        "operations instead).", what)
        return None
    import jaxlib
    texts = []
    for name in (source, *_HEADERS):
        with open(name, "rb") as f:
            texts.append(f.read())
    key = hashlib.sha256(b"\0".join([*texts, " ".join((cxx, *flags)).encode(),
                                     jaxlib.__version__.encode(), _cpu_signature().encode()]))
    out_dir = os.path.join(os.path.expanduser("~"), ".cache", "llama_jax", "kernels",
                           key.hexdigest()[:16])
    path = os.path.join(out_dir, f"{what}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", source, "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        logging.warning("llama_jax: building the CPU %s kernel failed (%s); XLA's operations "
                        "are used instead. %s", what, " ".join(cmd), result.stderr[-2000:])
        return None
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole library or none
    return path


def _library(source: str):
    """The loaded library built from `source`, or None: LLAMA_JAX_CPU_KERNELS=0, a non-CPU
    default backend, no compiler or a failed build (logged)."""
    if os.environ.get(ENV, "1") == "0" or jax.default_backend() != "cpu":
        return None
    path = _build(source=source)
    return None if path is None else ctypes.cdll.LoadLibrary(path)


def _require(available: bool, what: str) -> None:
    if not available:
        raise RuntimeError(f"the CPU {what} kernel is not available here (not a CPU backend, "
                           f"{ENV}=0, no C++ compiler or an unsupported CPU; see the log); "
                           f"check cpu_kernels.{what}_available() before calling it.")


def local_only() -> bool:
    """Whether a kernel call traced here sees whole arrays or one shard_map shard: no mesh
    axis that XLA partitions automatically has more than one device (a custom call is one
    operation XLA cannot split)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or all(size == 1 for name, size in zip(mesh.axis_names, mesh.axis_sizes)
                             if name not in mesh.manual_axes)


def _register(source: str, targets: dict[str, str], supported: str | None = None) -> bool:
    """Builds and loads the library of `source` and registers its handlers (FFI target name ->
    exported symbol); False when `_library` gives none or its `supported` function returns 0
    (a CPU without the instructions it was written for)."""
    lib = _library(source)
    if lib is None:
        return False
    if supported and not getattr(lib, supported)():
        logging.info("llama_jax: this CPU lacks what the %s kernel needs (AVX-512 BF16, or the "
                     "AMX tile state); XLA's operations are used instead.",
                     os.path.basename(source))
        return False
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return True


@functools.cache
def available() -> bool:
    """Whether `matmul` runs the kernel (built, loaded and registered once per process)."""
    return _register(_SOURCE, {_TARGET: "SmallMatmul", _LAYER_TARGET: "DecodeLayer"})


@functools.cache
def attention_available() -> bool:
    """Whether `attention_forward` / `attention_backward` run (built, loaded, registered once
    per process): as `available()`, and the CPU has AVX-512 BF16 (with AMX the process is
    granted the tile state first)."""
    return _register(_ATTENTION_SOURCE, {_ATTENTION_FORWARD: "AttentionForward",
                                         _ATTENTION_BACKWARD: "AttentionBackward"},
                     supported="LlamaJaxAttentionKernel")


ATTENTION_MULTIPLE = 32  # T and H must be multiples of it (kernels/attention.cc: kKeyTile)


def attention_forward(q, k, v, positions, segment_ids):
    """Self-attention of bf16 q [B, T, N, H], k, v [B, T, K, H] under attention_mask(positions,
    segment_ids) twice: (out [B, T, N, H] bf16, log-sum-exp [B, N, T] f32). A query that sees
    no key gets the mean of all values (the reference's uniform softmax), log-sum-exp +inf."""
    _require(attention_available(), "attention")
    b, t, n, _ = q.shape
    i32 = jnp.int32
    return jax.ffi.ffi_call(
        _ATTENTION_FORWARD,
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)))(
        q, k, v, positions.astype(i32), segment_ids.astype(i32))


def attention_backward(q, k, v, positions, segment_ids, out, d_out, lse):
    """(dq, dk, dv) of `attention_forward` for the output cotangent d_out (bf16)."""
    i32 = jnp.int32
    return jax.ffi.ffi_call(
        _ATTENTION_BACKWARD,
        tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)))(
        q, k, v, positions.astype(i32), segment_ids.astype(i32), out, d_out.astype(q.dtype), lse)


@functools.cache
def adamw_available() -> bool:
    """Whether `adamw` runs (built, loaded and registered once per process)."""
    return _register(_ADAMW_SOURCE, {_ADAMW: "AdamW"})


def adamw(p, g, m, v, scalars, *, b1: float, b2: float, eps: float, decay: bool):
    """One AdamW update of f32 p with gradient g and moments m, v, in place (p, m, v alias the
    results): (p, m, v). scalars f32 [8]: apply, clip trigger, gradient norm, max norm, the two
    bias corrections, step (-learning rate), weight decay (kernels/adamw.cc)."""
    _require(adamw_available(), "adamw")
    like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    return jax.ffi.ffi_call(_ADAMW, (like(p), like(m), like(v)),
                            input_output_aliases={0: 0, 2: 1, 3: 2})(
        p, g, m, v, scalars, b1=np.float32(b1), b2=np.float32(b2), eps=np.float32(eps),
        decay=bool(decay))


@functools.cache
def swiglu_available() -> bool:
    """Whether `swiglu_forward` / `swiglu_backward` run (built, loaded, registered once per
    process; AVX-512 BF16 needed)."""
    return _register(_SWIGLU_SOURCE, {_SWIGLU_FORWARD: "SwigluForward",
                                      _SWIGLU_BACKWARD: "SwigluBackward"},
                     supported="LlamaJaxSwigluKernel")


def swiglu_forward(gate, up):
    """f32 gate and up products -> (silu(g) * u, g, u) in bf16, g and u the products rounded
    (kernels/swiglu.cc)."""
    _require(swiglu_available(), "swiglu")
    out = jax.ShapeDtypeStruct(gate.shape, jnp.bfloat16)
    return jax.ffi.ffi_call(_SWIGLU_FORWARD, (out, out, out))(gate, up)


def swiglu_backward(dh, g, u):
    """(dg, du) of silu(g) * u for the bf16 cotangent dh (kernels/swiglu.cc)."""
    _require(swiglu_available(), "swiglu")
    out = jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
    return jax.ffi.ffi_call(_SWIGLU_BACKWARD, (out, out))(dh.astype(jnp.bfloat16), g, u)



@functools.partial(jax.tree_util.register_dataclass, data_fields=["tiles"],
                   meta_fields=["width", "out_shape"])
@dataclasses.dataclass(frozen=True)
class Packed:
    """A weight [*I, *O] as a [K, N] matrix (K = prod I, `width` N = prod O, `out_shape` O) in
    tiles [ceil(N/32), K, 32], zero-padded."""

    tiles: jax.Array
    width: int
    out_shape: tuple[int, ...]

    @classmethod
    def of(cls, w: jax.Array, n_in: int = 1) -> Packed:
        """w packed, its first n_in dims contracted."""
        out_shape = tuple(w.shape[n_in:])
        w = w.reshape(math.prod(w.shape[:n_in]), -1)
        k, n = w.shape
        pad = -n % TILE
        w = jnp.pad(w, ((0, 0), (0, pad))) if pad else w
        return cls(w.reshape(k, -1, TILE).transpose(1, 0, 2), n, out_shape)

    def unpacked(self) -> jax.Array:
        """The [K, N] weight (a copy)."""
        t, k, _ = self.tiles.shape
        return self.tiles.transpose(1, 0, 2).reshape(k, t * TILE)[:, :self.width]


def matmul(x: jax.Array, w: Packed, kernel: bool = True) -> jax.Array:
    """x [..., K] · w -> [..., N] float32: the kernel (MAX_ROWS rows per pass over w), or with
    kernel=False XLA's dot on w unpacked (a copy per call; faster for a prefill's rows)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    if not kernel:
        return jnp.matmul(x, w.unpacked().astype(x.dtype), preferred_element_type=jnp.float32)
    n_pad = w.tiles.shape[0] * TILE
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows, n_pad), jnp.float32))(
        x.reshape(rows, k).astype(jnp.float32), w.tiles)
    return y[:, :w.width].reshape(*lead, w.width)


def decode_layer(x, p: dict, cos, sin, slots, q_pos, q_seg, kv_pos, kv_seg, cache_k, cache_v, *,
                 layer: int, n_heads: int, eps: float):
    """One transformer block for one new token per row, in one kernel call.

    x [B, D] in the compute dtype; p one layer's weights (norms attn_norm, mlp_norm [D];
    projections wq, wk, wv, wo, w_gate, w_up, w_down `Packed`);
    cos, sin [B, H/2] float32 (RoPE at each row's position); slots, q_pos, q_seg [B] (the slot
    each row's k/v is written to, >= S drops it; the query's position and segment); kv_pos,
    kv_seg [B, S] (the cache's positions and segments, this token's included); cache_k,
    cache_v [L, B, S, K, H]. Writes the new k/v into layer `layer` in place (the caches are
    aliased to the outputs) and returns (x [B, D], cache_k, cache_v), with
    model.block's math and roundings.
    """
    f32, i32 = jnp.float32, jnp.int32
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    out, cache_k, cache_v = jax.ffi.ffi_call(
        _LAYER_TARGET,
        (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
         jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)),
        input_output_aliases={17: 1, 18: 2})(
        x.astype(f32), p["attn_norm"], p["mlp_norm"], *(p[k].tiles for k in names),
        cos.astype(f32), sin.astype(f32), slots.astype(i32), q_pos.astype(i32),
        q_seg.astype(i32), kv_pos.astype(i32), kv_seg.astype(i32), cache_k, cache_v,
        layer=np.int64(layer), n_heads=np.int64(n_heads), ffn_dim=np.int64(p["w_gate"].width),
        eps=np.float32(eps), round=x.dtype == jnp.bfloat16)
    return out.astype(x.dtype), cache_k, cache_v
