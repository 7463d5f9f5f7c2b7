"""The CPU decode kernels (llama_jax/cpu_kernels.py, kernels/decode.cc) against float64
products, against the reference attention and against decoding through XLA's dots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import attention, cpu_kernels, decode
from llama_jax import model as model_lib


def test_kernel_is_built_where_a_compiler_exists():
    """On the CPU test machines (a C++ compiler is present) the kernel must build and load:
    a silent fallback would leave decoding on XLA's dots unnoticed."""
    assert cpu_kernels.available()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_kernel_equals_float64_product(dtype, rows):
    """Rows 1-8 in one pass, 11 in two; widths that are not a multiple of the 32-column tile
    (padding), odd K and a single tile (nothing for the pool's half)."""
    rng = np.random.default_rng(rows)
    for k, n in ((512, 1408), (37, 259), (64, 32)):
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), dtype)
        packed = cpu_kernels.Packed.of(w)
        assert packed.tiles.shape == (-(-n // 32), k, 32)
        np.testing.assert_array_equal(np.asarray(packed.unpacked()), np.asarray(w))
        y = jax.jit(cpu_kernels.matmul)(x, packed)
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_the_reference(dtype):
    """The attention kernel writes the new k/v in place at each row's slot (a slot past the
    cache drops it) and equals attention.dot_product_attention under attention_mask's rule:
    random cache positions and segments, a row attending to another segment's slots, and a
    fully masked row (segment 0: uniform over all slots), with grouped query heads."""
    rng = np.random.default_rng(0)
    n_layers, b, s, k, g, h = 3, 3, 37, 2, 3, 16
    ck, cv = (jnp.asarray(rng.standard_normal((n_layers, b, s, k, h)), dtype) for _ in "kv")
    q = jnp.asarray(rng.standard_normal((b, k * g, h)), dtype)
    k_new, v_new = (jnp.asarray(rng.standard_normal((b, k, h)), dtype) for _ in "kv")
    slots = jnp.asarray([5, s - 1, s], jnp.int32)
    q_pos, q_seg = jnp.asarray([20, 25, 10], jnp.int32), jnp.asarray([1, 2, 0], jnp.int32)
    rows = jnp.arange(b)[:, None]
    kv_pos = jnp.asarray(rng.integers(0, 30, (b, s)), jnp.int32).at[rows, slots[:, None]].set(
        q_pos[:, None], mode="drop")
    kv_seg = jnp.asarray(rng.integers(0, 3, (b, s)), jnp.int32).at[rows, slots[:, None]].set(
        q_seg[:, None], mode="drop")
    layer = 1
    want_k = ck.at[layer, rows, slots[:, None]].set(k_new[:, None], mode="drop")
    want_v = cv.at[layer, rows, slots[:, None]].set(v_new[:, None], mode="drop")
    mask = attention.attention_mask(q_pos[:, None], q_seg[:, None], kv_pos, kv_seg)
    want = attention.dot_product_attention(q[:, None], want_k[layer], want_v[layer], mask)[:, 0]
    out, got_k, got_v = jax.jit(cpu_kernels.decode_attention, static_argnums=10)(
        q, k_new, v_new, slots, q_pos, q_seg, kv_pos, kv_seg, ck, cv, layer)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one rounding of the output
    np.testing.assert_allclose(np.asarray(out.astype(dtype), np.float32),
                               np.asarray(want, np.float32), atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoding_with_the_kernel_equals_xla(dtype):
    """Greedy decoding through packed weights and the kernel (decode steps) gives the tokens
    of XLA's dots, and log-probabilities within float32 (bf16: bf16) rounding of them."""
    c = lj.get_config("tiny", n_layers=2, vocab_size=259)  # 259: a padded head tile
    model = decode.with_dtype(lj.create(c), dtype)
    prompts = [[1, 5, 7, 9, 11], [1, 4], [1, 200, 3]]
    with_kernel = decode.prepare(model)
    assert isinstance(with_kernel.head, cpu_kernels.Packed)
    assert isinstance(with_kernel.layers[0]["w_up"], cpu_kernels.Packed)
    cache = model_lib.init_cache(model.config, len(prompts), 32)
    ones = jnp.ones((len(prompts), 1), jnp.int32)
    step = jax.jit(decode.forward).lower(with_kernel, ones, ones, ones, cache).as_text()
    # a decode step calls the kernel for all 7 projections of every layer and the head, and
    # the attention kernel once per layer
    assert step.count(f"@{cpu_kernels._TARGET}") == 7 * c.n_layers + 1
    assert step.count(f"@{cpu_kernels._ATTENTION_TARGET}") == c.n_layers
    got = decode.generate(with_kernel, prompts, 24, stop_ids=[])
    want = decode.generate(decode.prepare(model, kernel=False), prompts, 24, stop_ids=[])
    np.testing.assert_array_equal(got.tokens, want.tokens)
    tol = 1e-4 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=tol)


def test_kernel_off_by_environment_and_explicit_request_fails(monkeypatch):
    """LLAMA_JAX_CPU_KERNELS=0 turns the kernel off (XLA's dots); prepare(kernel=True) then
    says why instead of silently decoding without it."""
    model = lj.create(lj.get_config("tiny"))
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    cpu_kernels.available.cache_clear()
    try:
        assert not cpu_kernels.available()
        assert isinstance(decode.prepare(model).head, tuple)
        with pytest.raises(ValueError, match="CPU kernel"):
            decode.prepare(model, kernel=True)
    finally:
        monkeypatch.delenv(cpu_kernels.ENV)
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()
