"""Weight products in the compute dtype with float32 accumulation, in the forms that run on
XLA:CPU's fast bfloat16 kernels in the backward pass too.

    y = dense(x, w)                   # einsum "...i,io->...o": x [..., D], w [D, F]
    y = dense(x, wq)                  # "btd,dnh->btnh": w's trailing dims are output dims
    y = dense(x, wo, n_in=2)          # "btnh,nhd->btd": x's last two dims are contracted
    logits = dense(x, head, out_dtype=jnp.float32)

Why not a plain einsum. XLA:CPU (JAX 0.10) sends a dot to its bf16 kernels (YNNPACK) only
when it is bf16 × bf16 -> f32 and its left operand contracts its minor, row-major dimension
(`IsDotSupportedByYnn` in xla/backends/cpu/ynn_support.cc); any other bf16 dot is upcast to an
f32 one plus converts. A bf16 einsum that returns bf16 is therefore an f32 product, and so is
the weight gradient xᵀ·g that autodiff writes (its left operand contracts the token axis). On
the 2-core AVX-512 bench machine a [2048, 512]·[512, 1408] product runs at 420-440 GFLOP/s as
bf16 -> f32 and at ~220 as bf16 -> bf16 or f32; before this module the bench shape's bf16 train
step ran every weight product in f32 and was barely faster than f32 training.

The custom VJP writes the three products of a layer in the fast form:
    y  = x · w   accumulated in f32, rounded to the compute dtype (or out_dtype)
    dx = g · wᵀ  contracting the minor dims of g and w
    dw = xᵀ · g  with xᵀ written out row-major, accumulated and returned in w's dtype (f32
                 master weights get an f32 gradient with no bf16 rounding in between)
The incoming gradient g is cast to the compute dtype first, as PyTorch's autocast does for
the output projection. In float32 the same code is an f32 product throughout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from llama_jax.backends.cpu import kernels


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contracts the last n_in dims of x [..., *I] (compute dtype) with the first n_in dims
    of w [*I, *O] (cast to x's dtype): [..., *O] in out_dtype (default x's dtype)."""
    lead, inner, outer = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    if x.shape[x.ndim - n_in:] != inner:
        raise ValueError(f"dense: x {x.shape} does not end in w's input dims {inner}.")
    x, w = same_manual_axes(x, w)
    # Only the contracted and the output dims are merged: merging the leading B and T would
    # make GSPMD gather a T split over the context axis.
    k, n = math.prod(inner), math.prod(outer)
    y = _matmul(x.reshape(*lead, k), w.reshape(k, n), jnp.dtype(out_dtype or x.dtype), w.dtype)
    return y.reshape(*lead, *outer)


def same_manual_axes(x, w):
    """Inside shard_map, marks x and w as varying over the union of their manual axes (e.g. a
    weight copied over the context axis times activations split over it). Autodiff of a plain
    dot does this implicitly and sums the weight gradient over those axes in the transpose; a
    custom VJP must return gradients typed like its inputs, so the cast happens outside it."""
    vx, vw = _manual_axes(x), _manual_axes(w)
    return _varying(x, vw - vx), _varying(w, vx - vw)


def varying_like(a, *others):
    """a marked as varying over every manual mesh axis that any of `others` varies over."""
    axes = frozenset().union(*(_manual_axes(o) for o in others)) - _manual_axes(a)
    return _varying(a, axes)


def einsum(spec: str, x: jax.Array, w, out_dtype=None) -> jax.Array:
    """The backend's weight product: `spec` is model.project's einsum ("btd,dnh->btnh",
    "btnh,nhd->btd", "...d,dv->...v"), x's trailing letters contracted with w's leading ones.
    Runs `dense` for an array w and the product kernel for a decode-packed w (kernels.Packed:
    up to kernels.PREFILL_ROWS rows, else XLA's dot on the unpacked weight)."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n_in = sum(1 for a in w_axes if a not in out)
    if not isinstance(w, kernels.Packed):
        return dense(x, w, n_in=n_in, out_dtype=out_dtype)
    lead = x.shape[:x.ndim - n_in]
    rows = math.prod(lead)
    y = kernels.matmul(x.reshape(*lead, -1), w, kernel=rows <= kernels.PREFILL_ROWS)
    return y.reshape(*lead, *w.out_shape).astype(out_dtype or x.dtype)


def _manual_axes(a) -> frozenset:
    """The manual mesh axes `a` varies over (empty outside shard_map)."""
    return frozenset(jax.typeof(a).manual_axis_type.varying)


def _varying(a, axes):
    return jax.lax.pcast(a, tuple(sorted(axes)), to="varying") if axes else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, out_dtype, w_dtype):
    """x [..., K] · w [K, N] -> [..., N] out_dtype, f32 accumulation, w cast to x's dtype;
    w_dtype = w.dtype, static for the backward pass, which keeps only the cast copy of w."""
    return _dot(x, w.astype(x.dtype), (x.ndim - 1,), (0,)).astype(out_dtype)


def _matmul_fwd(x, w, out_dtype, w_dtype):
    w = w.astype(x.dtype)  # the residual: half the bytes of f32 master weights
    return _dot(x, w, (x.ndim - 1,), (0,)).astype(out_dtype), (x, w)


def _matmul_bwd(out_dtype, w_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _dot(g, w, (g.ndim - 1,), (1,))  # [..., N] · [K, N] -> [..., K]
    lead = tuple(range(x.ndim - 1))  # [K, ...] · [..., N] -> [K, N]
    dw = _dot(_transposed(x), g, tuple(d + 1 for d in lead), lead)
    return dx.astype(x.dtype), dw.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot(a, b, a_contract: tuple, b_contract: tuple):
    """a · b over the given dims (no batch dims), accumulated and returned in f32."""
    return jax.lax.dot_general(a, b, ((a_contract, b_contract), ((), ())),
                               preferred_element_type=jnp.float32)


def _transposed(x):
    """x [..., K] -> [K, ...], materialised row-major (see `transpose`)."""
    return transpose(x, (x.ndim - 1, *range(x.ndim - 1)))


def transpose(x, perm):
    """jnp.transpose(x, perm), materialised row-major. A plain transpose reaches XLA as a
    permuted layout (a free bitcast), and XLA:CPU then upcasts a bf16 dot that reads it to an
    f32 product; the detour through a leading unit axis makes the dot's operand a row-major
    copy instead, so the dot stays bf16 and layout assignment writes the transpose out (one
    pass over x)."""
    return jnp.transpose(x[None], (0, *(p + 1 for p in perm)))[0]


# ----------------------------------------------------------------------------------------------
# SwiGLU's gate and up projections with the CPU kernel for its elementwise part: XLA:CPU
# converts each f32 product to bf16 in its own pass, runs silu(g) * u as another and the
# backward's dg and du as two more that each re-read dh, g and u; kernels/swiglu.cc does the
# forward in one pass over the two f32 products and the backward in one over dh, g, u.

def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *, kernel: bool = True):
    """silu(x · w_gate) * (x · w_up) in x's dtype, x [..., D], w_gate and w_up [D, F]: the
    products as `dense`, the elementwise part on the CPU kernel (with `kernel`) for bf16 where
    no mesh axis is partitioned automatically (elsewhere exactly `silu(dense(x, w_gate)) *
    dense(x, w_up)`)."""
    if isinstance(w_gate, kernels.Packed):  # decoding: the packed products
        return jax.nn.silu(einsum("btd,df->btf", x, w_gate)) * einsum("btd,df->btf", x, w_up)
    if not (kernel and x.dtype == jnp.bfloat16 and kernels.local_only()
            and kernels.swiglu_available()):
        return jax.nn.silu(dense(x, w_gate)) * dense(x, w_up)
    x, w_gate = same_manual_axes(x, w_gate)
    x, w_up = same_manual_axes(x, w_up)
    return _swiglu(x, w_gate, w_up, w_gate.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu(x, w_gate, w_up, w_dtype):
    return _swiglu_fwd(x, w_gate, w_up, w_dtype)[0]


def _swiglu_fwd(x, w_gate, w_up, w_dtype):
    wg, wu = w_gate.astype(x.dtype), w_up.astype(x.dtype)
    contract = ((x.ndim - 1,), (0,))
    h, g, u = kernels.swiglu_forward(_dot(x, wg, *contract), _dot(x, wu, *contract))
    return h, (x, wg, wu, g, u)


def _swiglu_bwd(w_dtype, res, dh):
    x, wg, wu, g, u = res
    dg, du = kernels.swiglu_backward(dh, g, u)
    last = (dg.ndim - 1,)
    dx = _dot(dg, wg, last, (1,)) + _dot(du, wu, last, (1,))
    lead = tuple(range(x.ndim - 1))
    xt = _transposed(x)
    dw = lambda d: _dot(xt, d, tuple(i + 1 for i in lead), lead).astype(w_dtype)  # noqa: E731
    return dx.astype(x.dtype), dw(dg), dw(du)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ----------------------------------------------------------------------------------------------
# RMSNorm's gain and RoPE's table in XLA:CPU's forms.


def scale_rows(y: jax.Array, scale: jax.Array) -> jax.Array:
    """y [..., D] * scale [D] in y's dtype (as HF's LlamaRMSNorm, which rounds the normalised
    rows first), with the gain's gradient summed over the rows in float32 and returned in
    scale's dtype. Autodiff of the bf16 product sums bf16 products (less exact), which
    XLA:CPU ran as a separate convert pass and a single-threaded reduce-window per gain."""
    y, scale = same_manual_axes(y, scale)
    return _scale_rows(y, scale)


@jax.custom_vjp
def _scale_rows(y, scale):
    return y * scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)


def _scale_rows_fwd(y, scale):
    return _scale_rows(y, scale), (y, scale)


def _scale_rows_bwd(res, g):
    y, scale = res
    d_y = g.astype(y.dtype) * scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)
    rows = tuple(range(y.ndim - 1))
    d_scale = jnp.sum(g.astype(jnp.float32) * y.astype(jnp.float32), axis=rows)
    return d_y, d_scale.astype(scale.dtype)


_scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)


def rope_table(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """model.rope_table behind a conditional: XLA:CPU fuses cos and sin into every rotation
    that reads them and evaluates them there for each of the n heads' elements, shared table
    or not (~65 ms of the bench shape's 0.88 s bf16 train step); a conditional is a fusion
    boundary. Both branches are the same."""
    from llama_jax import model  # noqa: PLC0415 - the plain table
    table = lambda: model.rope_table(positions, inv_freq)  # noqa: E731
    return jax.lax.cond(positions[0, 0] != jnp.iinfo(jnp.int32).min, table, table)
