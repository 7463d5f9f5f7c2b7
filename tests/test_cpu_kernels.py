"""The cpu backend's decode kernels (backends/cpu/kernels.py, csrc/decode.cc) against float64
products, against the reference attention and against decoding through XLA's dots."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import attention, backends, decode
from llama_jax import model as model_lib
from llama_jax.backends import cpu as cpu_backend
from llama_jax.backends.cpu import kernels as cpu_kernels


def _on_cpu(model):
    return lj.with_backend(model, backends.get("cpu"))


@pytest.fixture(scope="module")
def portable_targets():
    """The kernels built without AVX-512 (the plain C++ path of other CPUs), registered under
    their own target names."""
    path = cpu_kernels._build(cpu_kernels._FLAGS + ("-mno-avx512f",))
    assert path is not None
    lib = ctypes.cdll.LoadLibrary(path)
    names = {"_TARGET": "llama_jax_small_matmul_portable",
             "_LAYER_TARGET": "llama_jax_decode_layer_portable"}
    jax.ffi.register_ffi_target(names["_TARGET"], jax.ffi.pycapsule(lib.SmallMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(names["_LAYER_TARGET"], jax.ffi.pycapsule(lib.DecodeLayer),
                                platform="cpu")
    return names


def test_kernel_is_built_where_a_compiler_exists():
    """On the CPU test machines (a C++ compiler is present) the kernel must build and load:
    a silent fallback would leave decoding on XLA's dots unnoticed."""
    assert cpu_kernels.available()


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_kernel_equals_float64_product(dtype, rows, portable, request, monkeypatch):
    """Rows 1-8 in one pass over w, 11 in two; widths that are not a multiple of the 32-column tile
    (padding), odd K and a single tile (nothing for the pool's half); AVX-512 and plain C++."""
    if portable:
        targets = request.getfixturevalue("portable_targets")
        monkeypatch.setattr(cpu_kernels, "_TARGET", targets["_TARGET"])
    rng = np.random.default_rng(rows)
    for k, n in ((512, 1408), (37, 259), (64, 32)):
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), dtype)
        packed = cpu_kernels.Packed.of(w)
        assert packed.tiles.shape == (-(-n // 32), k, 32)
        np.testing.assert_array_equal(np.asarray(packed.unpacked()), np.asarray(w))
        product = jax.jit(lambda x, w: cpu_kernels.matmul(x, w))  # traced anew: the target
        assert f"@{cpu_kernels._TARGET}(" in product.lower(x, packed).as_text()
        y = product(x, packed)
        ref = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
        assert y.shape == (rows, n) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rows_are_independent_of_the_batch():
    """A row's result does not depend on the other rows of the call (same accumulation order),
    so a prompt decodes the same alone and in a batch."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 96)), jnp.float32)
    packed = cpu_kernels.Packed.of(jnp.asarray(rng.standard_normal((96, 200)), jnp.float32))
    together = np.asarray(cpu_kernels.matmul(x, packed))
    for i in (0, 5, 7):
        np.testing.assert_array_equal(np.asarray(cpu_kernels.matmul(x[i:i + 1], packed))[0],
                                      together[i])


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layer_equals_the_xla_layer(dtype, portable, request, monkeypatch):
    """One block through the layer kernel equals model.block (XLA) on the same
    weights: random cache contents, positions and segments, a row that attends to another
    segment's slots, a padding row (segment 0: its k/v dropped, attention uniform over all
    slots), grouped query heads, a head dim whose RoPE halves are not a multiple of 16, and
    the cache written in place at each row's slot. bf16 rounds after every operation as XLA
    does, so the two agree to a bf16 unit in the last place. Both builds: AVX-512 and the
    plain C++ path."""
    if portable:
        for name, target in request.getfixturevalue("portable_targets").items():
            monkeypatch.setattr(cpu_kernels, name, target)
    c = lj.get_config("tiny", n_layers=2, dim=96, n_heads=6, n_kv_heads=2, ffn_dim=200)
    model = decode.with_dtype(_on_cpu(lj.create(c, seed=1)), dtype)
    packed, plain = decode.prepare(model), decode.prepare(model, kernel=False)
    assert isinstance(packed.layers[1]["attn"]["wq"], cpu_kernels.Packed)
    rng = np.random.default_rng(0)
    b, s, layer = 11, 37, 1  # 11 rows: two passes of the kernel's 8-row blocks
    shape = (c.n_layers, b, s, c.n_kv_heads, c.head_dim)
    ck, cv = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in "kv")
    x = jnp.asarray(rng.standard_normal((b, 1, c.dim)), dtype)
    positions = jnp.asarray([[20], [25], [10]] + [[i] for i in range(21, 29)], jnp.int32)
    segments = jnp.asarray([[1], [2], [0]] + [[1]] * 8, jnp.int32)
    slots = jnp.asarray([[5], [s - 1], [s]] + [[i] for i in range(6, 14)], jnp.int32)
    rows = jnp.arange(b)[:, None]
    kv_pos = jnp.asarray(rng.integers(0, 30, (b, s)), jnp.int32).at[rows, slots].set(
        positions, mode="drop")
    kv_seg = jnp.asarray(rng.integers(0, 3, (b, s)), jnp.int32).at[rows, slots].set(
        segments, mode="drop")
    mask = attention.attention_mask(positions, segments, kv_pos, kv_seg)
    rope = model_lib.rope_table(positions, model_lib.rope_frequencies(c))

    @jax.jit
    def run(weights, x, ck, cv):
        lc = model_lib.LayerCache(ck, cv, layer, slots, mask, kv_pos, kv_seg)
        p, ops = weights.layers[layer], weights.backend
        if ops.decode_block is not None:
            x, (ck, cv) = ops.decode_block(c, p, x, positions, segments, rope, lc)
        else:
            x, (ck, cv) = model_lib.block(p, x, positions, segments, rope, ops, c.norm_eps, lc)
        return x, ck, cv

    got, want = run(packed, x, ck, cv), run(plain, x, ck, cv)
    step = jax.jit(run).lower(packed, x, ck, cv).as_text()
    assert step.count(f"@{cpu_kernels._LAYER_TARGET}") == 1
    assert f"@{cpu_kernels._TARGET}" not in step
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        else:
            np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=2 ** -7 * np.abs(w).max())
    written = [(layer, 0, 5), (layer, 1, s - 1)] + [(layer, i, i + 3) for i in range(3, 11)]
    for cache, old in zip(got[1:], (ck, cv)):  # each row's slot in `layer`; row 2 dropped
        changed = np.argwhere(np.any(np.asarray(cache) != np.asarray(old), axis=(-1, -2)))
        assert sorted(map(tuple, changed)) == sorted(written)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoding_with_the_kernel_equals_xla(dtype):
    """Greedy decoding through packed weights and the kernels (prefill and decode steps) gives
    the tokens of XLA's dots, and log-probabilities within float32 (bf16: bf16) rounding."""
    c = lj.get_config("tiny", n_layers=2, vocab_size=259)  # 259: a padded head tile
    model = decode.with_dtype(_on_cpu(lj.create(c)), dtype)
    prompts = [[1, 5, 7, 9, 11], [1, 4], [1, 200, 3]]
    with_kernel = decode.prepare(model)
    assert isinstance(with_kernel.head, cpu_kernels.Packed)
    assert isinstance(with_kernel.layers[0]["mlp"]["w_up"], cpu_kernels.Packed)
    cache = model_lib.init_cache(model.config, len(prompts), 32)
    ones = jnp.ones((len(prompts), 1), jnp.int32)
    step = jax.jit(decode.forward).lower(with_kernel, ones, ones, ones, cache).as_text()
    # a decode step calls the layer kernel once per layer and the matmul kernel for the head
    assert step.count(f"@{cpu_kernels._LAYER_TARGET}") == c.n_layers
    assert step.count(f"@{cpu_kernels._TARGET}") == 1
    # a prefill of up to PREFILL_ROWS tokens runs every projection and the head on the product
    # kernel; a longer one on XLA's dots
    for t, calls in ((8, 7 * c.n_layers + 1), (cpu_kernels.PREFILL_ROWS // 3 + 1, 0)):
        rows = jnp.ones((len(prompts), t), jnp.int32)
        cache = model_lib.init_cache(model.config, len(prompts), 2 * t)
        prefill = jax.jit(decode.forward).lower(with_kernel, rows, rows, rows, cache).as_text()
        assert prefill.count(f"@{cpu_kernels._TARGET}") == calls
        assert f"@{cpu_kernels._LAYER_TARGET}" not in prefill
    got = decode.generate(with_kernel, prompts, 24, stop_ids=[])
    want = decode.generate(decode.prepare(model, kernel=False), prompts, 24, stop_ids=[])
    np.testing.assert_array_equal(got.tokens, want.tokens)
    tol = 1e-4 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=tol)


def test_kernel_off_by_environment_and_explicit_request_fails(monkeypatch):
    """LLAMA_JAX_CPU_KERNELS=0 turns the kernel off (XLA's dots); prepare(kernel=True) then
    says why instead of silently decoding without it."""
    def clear():
        for cached in (cpu_kernels.available, cpu_backend.make, backends.get):
            cached.cache_clear()
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    clear()
    try:
        model = _on_cpu(lj.create(lj.get_config("tiny")))
        assert not cpu_kernels.available()
        assert not isinstance(decode.prepare(model).head, cpu_kernels.Packed)
        with pytest.raises(ValueError, match="decode kernels"):
            decode.prepare(model, kernel=True)
    finally:
        monkeypatch.delenv(cpu_kernels.ENV)
        clear()
    assert cpu_kernels.available()
