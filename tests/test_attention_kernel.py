"""The CPU attention kernel (llama_jax/backends/cpu/csrc/attention.cc, bf16 self-attention forward and
backward) against the reference einsum attention: values and gradients with packed documents,
padding queries, tokens out of order, GQA groups of 4 and 1, head dims 64 and 128, T not a
multiple of the 64-query block; its AVX-512 BF16 build for CPUs without AMX; and where
materialized_attention runs it."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention, sharding
from llama_jax.backends.cpu import attention as cpu_attention
from llama_jax.backends.cpu import kernels as cpu_kernels


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and flag in line.split() for line in f)


def test_kernel_is_available_where_the_cpu_has_avx512_bf16():
    """A silent fallback would leave bf16 training on XLA's slower attention unnoticed; a CPU
    without AVX-512 BF16 must not claim the kernel."""
    assert cpu_kernels.attention_available() == _cpu_has("avx512_bf16")


def _inputs(b, t, n, k, h, order, seed=0):
    """bf16 q, k, v of a packed batch: row 0 one document with padding inside it, row 1 three
    documents and padding at the end; `permuted`: every row's tokens in a random order."""
    rng = np.random.default_rng(seed)
    bf = lambda shape, s: jnp.asarray(rng.normal(size=shape) * s, jnp.bfloat16)  # noqa: E731
    q, k_, v = bf((b, t, n, h), 1.5), bf((b, t, k, h), 1.5), bf((b, t, k, h), 1.0)
    idx = np.arange(t)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(idx, (b, 1)).astype(np.int32)
    seg[0, 40:44] = 0
    cuts = [t // 4, t // 2 + 3]
    seg[1] = 1 + (idx >= cuts[0]) + (idx >= cuts[1])
    pos[1] = idx - np.where(idx >= cuts[1], cuts[1], np.where(idx >= cuts[0], cuts[0], 0))
    seg[1, -5:] = 0
    if order == "permuted":
        perm = rng.permutation(t)
        q, k_, v, pos, seg = q[:, perm], k_[:, perm], v[:, perm], pos[:, perm], seg[:, perm]
    return q, k_, v, jnp.asarray(pos), jnp.asarray(seg)


def _loss(fn):
    def f(q, k, v):
        out = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape))
    return f


def _check_against_reference(q, k, v, pos, seg):
    """The kernel path equals the f32 reference on the same bf16 inputs within bf16 rounding
    (2% of the largest value; a wrong mask or softmax is off by far more), and runs the
    kernel (the custom calls are in the compiled step)."""
    fn = lambda q, k, v: cpu_attention.materialized_attention(q, k, v, pos, seg)  # noqa: E731
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref_fn = lambda q, k, v: attention.reference_attention(f32(q), f32(k), f32(v), pos, seg)  # noqa
    value_and_grad = jax.jit(jax.value_and_grad(_loss(fn), argnums=(0, 1, 2)))
    hlo = value_and_grad.lower(q, k, v).as_text()
    assert cpu_kernels._ATTENTION_FORWARD in hlo and cpu_kernels._ATTENTION_BACKWARD in hlo
    out, ref = jax.jit(fn)(q, k, v), ref_fn(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref),
                               atol=0.02 * float(jnp.abs(ref).max()))
    _, grads = value_and_grad(q, k, v)
    _, ref_grads = jax.value_and_grad(_loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r),
                                   atol=0.02 * float(jnp.abs(r).max()))


needs_kernel = pytest.mark.skipif(not _cpu_has("avx512_bf16"),
                                  reason="the CPU has no AVX-512 BF16 (checked above)")


@needs_kernel
@pytest.mark.parametrize("order", ["in-order", "permuted"])
@pytest.mark.parametrize("shape", [(2, 160, 8, 2, 64), (2, 96, 2, 2, 128)],
                         ids=["gqa4-h64", "mha-h128"])
def test_kernel_equals_reference_with_gradients(shape, order):
    _check_against_reference(*_inputs(*shape, order=order))


@needs_kernel
def test_avx512_bf16_build_equals_reference(monkeypatch):
    """The build for CPUs with AVX-512 BF16 but no AMX (its products on vdpbf16ps)."""
    path = cpu_kernels._build(cpu_kernels._FLAGS + ("-mno-amx-tile", "-mno-amx-bf16"),
                              source=cpu_kernels._ATTENTION_SOURCE)
    lib = ctypes.cdll.LoadLibrary(path)
    assert lib.LlamaJaxAttentionKernel() == 1  # 2 is the AMX build
    assert cpu_kernels.attention_available()
    for name, symbol in (("_ATTENTION_FORWARD", lib.AttentionForward),
                         ("_ATTENTION_BACKWARD", lib.AttentionBackward)):
        target = getattr(cpu_kernels, name) + "_avx512"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        monkeypatch.setattr(cpu_kernels, name, target)
    _check_against_reference(*_inputs(2, 96, 4, 2, 64, order="in-order", seed=1))


@needs_kernel
def test_kernel_runs_only_where_it_applies():
    """bf16 with T and H multiples of 32 outside a partitioned mesh; not in f32, not for other
    shapes, not when turned off, not under a mesh whose axes XLA partitions (one custom call
    cannot be split), and inside shard_map on the local shard."""
    q, k, v, pos, seg = _inputs(2, 64, 4, 2, 64, order="in-order")

    def uses_kernel(q, k, v, pos=pos, seg=seg, kernel=True):
        fn = jax.jit(lambda q, k, v: cpu_attention.materialized_attention(q, k, v, pos, seg,
                                                                          kernel=kernel))
        return cpu_kernels._ATTENTION_FORWARD in fn.lower(q, k, v).as_text()
    assert uses_kernel(q, k, v)
    assert not uses_kernel(*(a.astype(jnp.float32) for a in (q, k, v)))
    assert not uses_kernel(q[:, :48], k[:, :48], v[:, :48], pos[:, :48], seg[:, :48])
    assert not uses_kernel(q, k, v, kernel=False)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 1, 1), jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert not uses_kernel(q, k, v)
    spec = jax.sharding.PartitionSpec("data")
    local = jax.shard_map(lambda q, k, v, p, s: cpu_attention.materialized_attention(q, k, v, p, s),
                          mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    with jax.set_mesh(mesh):
        text = jax.jit(local).lower(q, k, v, pos, seg).as_text()
        out = jax.jit(local)(q, k, v, pos, seg)
    assert cpu_kernels._ATTENTION_FORWARD in text
    ref = cpu_attention.materialized_attention(q, k, v, pos, seg)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
