"""dense(): the einsum it replaces, in value and gradient; bf16 operands in every product XLA
compiles for it (forward and backward); and its gradient inside shard_map. swiglu(): the CPU
kernel against f32, and the plain composition elsewhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.backends.cpu import dense as dense_lib
from llama_jax.backends.cpu import kernels as cpu_kernels
from llama_jax.backends.cpu.dense import dense

# (x shape, w shape, n_in, einsum): a projection with trailing output dims, and wo's two
# contracted dims. Every side >= 16: XLA:CPU leaves tiny dots to other code.
CASES = {
    "q": ((2, 16, 32), (32, 4, 16), 1, "btd,dnh->btnh"),
    "o": ((2, 16, 4, 16), (4, 16, 32), 2, "btnh,nhd->btd"),
}


def _args(case, dtype):
    xs, ws, n_in, eq = CASES[case]
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(kx, xs).astype(dtype), jax.random.normal(kw, ws) * 0.1, n_in, eq


def _loss(f):
    """Sum of (f(x, w) · fixed weights): a cotangent that differs per output element."""
    return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * jnp.cos(
        jnp.arange(f(x, w).size, dtype=jnp.float32).reshape(f(x, w).shape)))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_einsum_value_and_gradients_f32(case):
    x, w, n_in, eq = _args(case, jnp.float32)
    ours = lambda x, w: dense(x, w, n_in=n_in)  # noqa: E731
    ref = lambda x, w: jnp.einsum(eq, x, w)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(_loss(ours), argnums=(0, 1))(x, w)
    g_ref = jax.grad(_loss(ref), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_dtypes_and_gradients_near_f32():
    """bf16 activations, f32 weights: bf16 output, f32 logits on request, an f32 weight
    gradient (not rounded to bf16), and gradients within bf16's ~0.4% of the f32 ones."""
    x, w, n_in, eq = _args("q", jnp.float32)
    xb = x.astype(jnp.bfloat16)
    assert dense(xb, w).dtype == jnp.bfloat16
    assert dense(xb, w, out_dtype=jnp.float32).dtype == jnp.float32
    gx, gw = jax.grad(_loss(dense), argnums=(0, 1))(xb, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    rx, rw = jax.grad(_loss(lambda x, w: jnp.einsum(eq, x, w)), argnums=(0, 1))(
        xb.astype(jnp.float32), w)
    for a, b in ((gx, rx), (gw, rw)):
        a = np.asarray(a, np.float32)
        assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in compiled HLO text."""
    out = []
    for comp in re.split(r"\n\n", hlo):
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", comp))
        for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", comp):
            out.append((types[lhs], types[rhs]))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_product_stays_bf16_in_the_compiled_backward(case):
    """The point of dense(): XLA:CPU keeps the forward and both backward products bf16 (a
    plain bf16 einsum and its autodiff are compiled as f32 dots)."""
    x, w, n_in, _ = _args(case, jnp.bfloat16)
    step = jax.jit(jax.value_and_grad(_loss(lambda x, w: dense(x, w, n_in=n_in)), (0, 1)))
    dtypes = _dot_operand_dtypes(step.lower(x, w).compile().as_text())
    assert len(dtypes) == 3 and set(dtypes) == {("bf16", "bf16")}, dtypes


def test_gradient_inside_shard_map_sums_over_the_split_axis():
    """Tokens split over a manual mesh axis, weights replicated: the custom VJP's weight
    gradient must be the sum over ranks, i.e. the gradient of the whole batch."""
    x, w, _, _ = _args("q", jnp.float32)
    mesh = jax.make_mesh((2,), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    P = jax.sharding.PartitionSpec
    local = lambda x, w: jax.grad(_loss_sum, argnums=1)(x, w)  # noqa: E731
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"), P()),
                                    out_specs=P()))(x, w)
    np.testing.assert_allclose(sharded, jax.grad(_loss_sum, argnums=1)(x, w),
                               rtol=1e-5, atol=1e-5)


def _loss_sum(x, w):
    """A loss that is a sum over tokens, so per-rank gradients add up to the whole one."""
    return jnp.sum(jnp.sin(dense(x, w)))


def _swiglu_inputs(seed=0, shape=(2, 40, 64), f=96):
    kx, kg, ku = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = (jax.random.normal(kx, shape) * 2).astype(jnp.bfloat16)
    w = lambda k: jax.random.normal(k, (shape[-1], f)) * 0.2  # noqa: E731
    return x, w(kg), w(ku)


def _swiglu_loss(fn):
    def f(x, wg, wu):
        h = fn(x, wg, wu).astype(jnp.float32)
        return jnp.sum(h * jnp.cos(jnp.arange(h.size, dtype=jnp.float32).reshape(h.shape)))
    return f


@pytest.mark.skipif(not cpu_kernels.swiglu_available(),
                    reason="no AVX-512 BF16 (tests/test_attention_kernel.py checks that)")
def test_swiglu_kernel_value_and_gradients_near_f32():
    """bf16 SwiGLU through the CPU kernel (its custom calls are in the compiled gradient)
    against the f32 computation on the same bf16 inputs: within bf16 rounding (2% of the
    largest value; a wrong sigmoid derivative or a swapped gate/up is off by far more)."""
    x, wg, wu = _swiglu_inputs()
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = lambda x, wg, wu: jax.nn.silu(f32(x) @ wg) * (f32(x) @ wu)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(_swiglu_loss(dense_lib.swiglu), argnums=(0, 1, 2)))
    hlo = grad.lower(x, wg, wu).as_text()
    assert cpu_kernels._SWIGLU_FORWARD in hlo and cpu_kernels._SWIGLU_BACKWARD in hlo
    out = jax.jit(dense_lib.swiglu)(x, wg, wu)
    assert out.dtype == jnp.bfloat16
    want = ref(x, wg, wu)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want),
                               atol=0.02 * float(jnp.abs(want).max()))
    _, grads = grad(x, wg, wu)
    _, ref_grads = jax.value_and_grad(_swiglu_loss(ref), argnums=(0, 1, 2))(x, wg, wu)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r),
                                   atol=0.02 * float(jnp.abs(r).max()))
    # The tail of a 16-lane vector (40 * 96 * 2 is not a multiple of the chunk) and the XLA
    # path agree within bf16 rounding too.
    plain_fn = jax.jit(lambda *a: dense_lib.swiglu(*a, kernel=False))
    plain = plain_fn(x, wg, wu)
    assert cpu_kernels._SWIGLU_FORWARD not in plain_fn.lower(x, wg, wu).as_text()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(plain, np.float32),
                               atol=0.02 * float(jnp.abs(want).max()))


def test_swiglu_without_the_kernel_is_the_plain_composition():
    """f32 (and any partitioned mesh) takes exactly silu(dense(x, w_gate)) * dense(x, w_up)."""
    x, wg, wu = _swiglu_inputs(1)
    x = x.astype(jnp.float32)
    got = jax.jit(dense_lib.swiglu)(x, wg, wu)
    want = jax.jit(lambda x, wg, wu: jax.nn.silu(dense(x, wg)) * dense(x, wu))(x, wg, wu)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert cpu_kernels._SWIGLU_FORWARD not in jax.jit(dense_lib.swiglu).lower(x, wg, wu).as_text()
