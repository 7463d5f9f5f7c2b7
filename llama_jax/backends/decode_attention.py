"""Decode attention over a long KV cache: Pallas kernels that read each row's cache only up to
its length (flash-decoding), for TPU (Mosaic) and GPU (Triton).

    backends.get("auto")                                     # ragged_tpu / ragged_gpu there
    backends.get("plain", decode_attention="ragged_tpu")    # the same kernel interpreted (CPU)

model.self_attention's cache branch calls `Backend.decode_attention(q, kv, cache, positions,
segment_ids)`; it returns None where the kernel does not apply and the plain form runs
(attention.dot_product_attention over the cache with cache.mask). Where it applies it equals
the plain form (tests/test_decode_attention.py, in Pallas interpret mode):
- the mask rule itself (same non-zero segment, key position <= query position) is applied in
  every block the kernel reads, from the cache's slot positions and segments [B, S];
- blocks past a row's length are skipped, not read: model.LayerCache writes a token only at
  slot = its position (a token at a position >= S is dropped), so slot s holds position s or
  nothing and no slot past the row's largest query position is visible. Row b reads
  ceil((max_t positions[b, t] + 1) / block) blocks;
- a query that sees no slot (padding of a prefill chunk) gets zeros where the plain form gives
  the mean of all slots; neither is ever read (its k/v are not written, its logits unused);
- GQA: the G query heads of one kv head and the T queries of the step are the rows of one
  product with that head's keys, so K/V are never repeated;
- the kernel takes the stacked cache [L, B, S, K, H] and the layer index as an argument: no
  per-layer slice of the cache is copied out for it; likewise `head`, one kv head that all
  query heads use (a tensor rank whose query heads share it, decode_sharded.py).

TPU: the kernel reads the cache in the layout TPU's XLA gives it, so no step copies it
(`tpu_view`): [L, B, S, K, H] row-major where H is a multiple of 128 and K > 1 (llama3.1-8b);
slots minor, [L, B, K, H, S], where H < 128 (its K x H tiles would be half empty; llama3.2-1b,
H = 64); [L, B, K, S, H] where K = 1. The kernel reads that transpose, a bitcast there.
(Checked on v5e and v5p with libtpu: the default layouts of bf16 and f32 caches, H 64 / 128,
K 1 / 2 / 8.) Read as [L, B, S, K, H] the llama3.2-1b cache was copied into and back out of
row-major every step (tools/plan_decode.py, 8,192 slots: 4 copies of the whole cache, 537 MB;
none since, nor for llama3.1-8b).
Grid (B, S/block) with the online softmax's running max, sum and accumulator in VMEM;
block indices past a row's length map to its last block, so the pipeline issues no new DMA,
and the compute is skipped. One TensorCore walks a row's blocks in order (v5e and v6e have one
per chip, so splitting the length would buy nothing there); rows are `parallel` (megacore).
GPU: grid (B, K, splits), split-K: each program walks its share of the row's blocks, and the
partial results are merged by their log-sum-exp outside the kernel; `splits` is chosen so that
B x K x splits fills ~256 programs (an H200 has 132 SMs), the batch-1 case flash-decoding is for.

The plain form runs instead for T > MAX_QUERIES (a prefill), a cache type other than
LayerCache (the paged serving cache, llama_jax/serve/paged.py), S not a multiple of the block
(TPU: 128, the lanes of the slot-position tiles; GPU: 64), and on GPU a head dim that is not
a power of two (Triton tiles). On a sharded model the kernel runs per device inside a
shard_map (decode_sharded.py: XLA cannot partition a kernel call).

Axis letters: B batch, T queries, S cache slots, N query heads, K kv heads, G = N / K,
R = G x T query rows per kv head, H head dim, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_QUERIES = 8      # queries per row the kernel takes (a decode step, a few speculative ones)
TPU_BLOCKS = (512, 256, 128)
GPU_BLOCK = 64
GPU_PROGRAMS = 256   # B x K x splits to aim for
NEG = float(jnp.finfo(jnp.float32).min)


def _block_step(q, k, v, visible, scale, m, l, acc, *, slots_minor: bool = False):
    """One block of the online softmax (Milakov & Gimelshein 2018): q [R, H], k, v [blk, H]
    ([H, blk] if slots_minor), visible [R, blk]; m, l [R, 1] and acc [R, H] f32 -> their
    updates. Invisible keys get weight exactly 0 (not exp(NEG - m), which is 1 while a row has
    seen nothing)."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    # the precision of the inputs, whatever jax_default_matmul_precision says (Mosaic takes
    # fp32 contraction of f32 inputs only)
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
                            else jax.lax.Precision.DEFAULT)
    s = dot(q, k, (((1,), (0 if slots_minor else 1,)), ((), ())))
    s = jnp.where(visible, s * scale, NEG)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    pv = dot(p.astype(v.dtype), v, (((1,), (1 if slots_minor else 0,)), ((), ())))
    return m_new, corr * l + p.sum(axis=1, keepdims=True), corr * acc + pv


def _visible(q_pos, q_seg, k_pos, k_seg):
    """attention.attention_mask for q_pos, q_seg [R, 1] and k_pos, k_seg [1, blk]."""
    return (q_seg == k_seg) & (k_seg != 0) & (k_pos <= q_pos)


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic).


def _tpu_kernel(nblk_ref, where_ref, q_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, k_ref,
                v_ref, o_ref, m_ref, l_ref, acc_ref, *, scale, head_axis, slots_minor):
    del where_ref  # used by the index maps only
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < nblk_ref[b])
    def _block():
        visible = _visible(qpos_ref[...], qseg_ref[...], kpos_ref[...], kseg_ref[...])
        at = (slice(None),) * (head_axis or 0)
        for h in range(q_ref.shape[0]):  # kv heads, each with its G x T query rows
            kv = (k_ref[...], v_ref[...]) if head_axis is None else (k_ref[(*at, h)],
                                                                      v_ref[(*at, h)])
            m, l, acc = _block_step(q_ref[h], *kv, visible, scale, m_ref[h], l_ref[h],
                                    acc_ref[h], slots_minor=slots_minor)
            m_ref[h], l_ref[h], acc_ref[h] = m, l, acc

    @pl.when(j == pl.num_programs(1) - 1)
    def _out():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def tpu_view(h: int, kh: int) -> tuple[int, ...]:
    """The order of the cache's [L, B, S, K, H] dims that TPU's XLA lays out row-major
    (module docstring): the transpose the kernel reads, a bitcast there."""
    if h % 128:
        return (0, 1, 3, 4, 2)  # [L, B, K, H, S]: K x H tiles would be half empty
    return (0, 1, 3, 2, 4) if kh == 1 else (0, 1, 2, 3, 4)  # [L, B, 1, S, H] / as it is


def _tpu_call(q, qpos, qseg, kpos, kseg, k, v, nblk, where, blk, interpret, view, one_head):
    """q [B, K, R, H] (K = 1 if one_head); qpos, qseg [B, R, 1]; kpos, kseg [B, 1, S]; k, v
    the cache [L, B, S, K, H] transposed to `view` (tpu_view); where = [layer, kv head]: the
    layer read, and with one_head the one kv head (the K axis squeezed out of the blocks)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
    b, kh, r, h = q.shape
    s = k.shape[view.index(2)]
    minor = [d for d in view if d >= 2]  # the block's dims: S, K, H in the view's order

    def kv_block(i, j, nblk, where):  # past the row's length: its last block again (no DMA)
        at = (where[0], i, jnp.minimum(j, nblk[i] - 1), where[1] if one_head else 0, 0)
        return tuple(at[d] for d in view)  # at is indexed by [L, B, S, K, H]

    def slot_block(i, j, nblk, where):
        return (i, 0, jnp.minimum(j, nblk[i] - 1))

    row = lambda i, j, nblk, where: (i, 0, 0)  # noqa: E731
    kv_shape = tuple((None, None, blk, None if one_head else kh, h)[d] for d in view)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, s // blk),
        in_specs=[pl.BlockSpec((None, kh, r, h), lambda i, j, nblk, where: (i, 0, 0, 0)),
                  pl.BlockSpec((None, r, 1), row), pl.BlockSpec((None, r, 1), row),
                  pl.BlockSpec((None, 1, blk), slot_block),
                  pl.BlockSpec((None, 1, blk), slot_block),
                  pl.BlockSpec(kv_shape, kv_block), pl.BlockSpec(kv_shape, kv_block)],
        out_specs=pl.BlockSpec((None, kh, r, h), lambda i, j, nblk, where: (i, 0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((kh, r, 1), jnp.float32), pltpu.VMEM((kh, r, 1), jnp.float32),
                        pltpu.VMEM((kh, r, h), jnp.float32)])
    # what XLA's cost analysis counts for the call: this layer's cache up to its full length
    # (an upper bound: blocks past a row's length are not read), not the stacked operand
    item = k.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * b * kh * r * s * h, transcendentals=b * kh * r * s,
                           bytes_accessed=2 * b * s * kh * h * item + 2 * q.size * q.dtype.itemsize
                           + 2 * b * s * 4)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, scale=h ** -0.5,
                          head_axis=None if one_head else minor.index(3),
                          slots_minor=minor.index(2) > minor.index(4)),
        grid_spec=spec, cost_estimate=cost,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(nblk, where, q, qpos, qseg, kpos, kseg, k, v)


# ----------------------------------------------------------------------------------------------
# GPU (Triton).


def _gpu_kernel(nblk_ref, layer_ref, head_ref, q_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                k_ref, v_ref, o_ref, m_out, l_out, *, scale, blk, per_split):
    b, i = pl.program_id(0), pl.program_id(2)
    h = head_ref[()] + pl.program_id(1)  # the first kv head of this call, plus the program's
    q, layer = q_ref[...], layer_ref[()]
    q_pos, q_seg = qpos_ref[...][:, None], qseg_ref[...][:, None]

    def body(j, carry):
        at = pl.ds(j * blk, blk)
        visible = _visible(q_pos, q_seg, kpos_ref[b, at][None, :], kseg_ref[b, at][None, :])
        return _block_step(q, k_ref[layer, b, at, h, :], v_ref[layer, b, at, h, :], visible,
                           scale, *carry)

    r, hd = q.shape
    init = (jnp.full((r, 1), NEG, jnp.float32), jnp.zeros((r, 1), jnp.float32),
            jnp.zeros((r, hd), jnp.float32))
    lo = i * per_split
    m, l, acc = jax.lax.fori_loop(lo, jnp.minimum(lo + per_split, nblk_ref[()]), body, init)
    o_ref[...], m_out[...], l_out[...] = acc, m[:, 0], l[:, 0]


def _gpu_call(q, qpos, qseg, kpos, kseg, k, v, nblk, where, blk, interpret):
    """q [B, K', R, H] (R a power of two >= 16); qpos, qseg [B, R]; kpos, kseg [B, S];
    k, v [L, B, S, K, H]; where = [layer, the first of the K' kv heads q uses]. Returns out
    [B, K', R, H] f32."""
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
    b, kh, r, h = q.shape
    n_blocks = k.shape[2] // blk
    splits = max(1, min(n_blocks, GPU_PROGRAMS // (b * kh)))
    per_split = -(-n_blocks // splits)
    splits = -(-n_blocks // per_split)
    whole = pl.no_block_spec
    part = (b, kh, splits, r)
    o, m, l = pl.pallas_call(
        functools.partial(_gpu_kernel, scale=h ** -0.5, blk=blk, per_split=per_split),
        grid=(b, kh, splits),
        in_specs=[pl.BlockSpec((None,), lambda i, j, s: (i,)),
                  pl.BlockSpec((None,), lambda i, j, s: (0,)),
                  pl.BlockSpec((None,), lambda i, j, s: (1,)),
                  pl.BlockSpec((None, None, r, h), lambda i, j, s: (i, j, 0, 0)),
                  pl.BlockSpec((None, r), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((None, r), lambda i, j, s: (i, 0)),
                  whole, whole, whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, r, h), lambda i, j, s: (i, j, s, 0, 0)),
                   pl.BlockSpec((None, None, None, r), lambda i, j, s: (i, j, s, 0)),
                   pl.BlockSpec((None, None, None, r), lambda i, j, s: (i, j, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((*part, h), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
    )(nblk, where, where, q, qpos, qseg, kpos, kseg, k, v)
    # merge the splits by their log-sum-exp: weights exp(m_i - max m), empty splits add 0
    w = jnp.exp(m - m.max(axis=2, keepdims=True))
    total = (w * l).sum(axis=2)
    acc = (w[..., None] * o).sum(axis=2)
    return acc / jnp.where(total == 0, 1.0, total)[..., None]


# ----------------------------------------------------------------------------------------------
# The Backend piece.


def _tpu_block(s: int) -> int | None:
    return next((b for b in TPU_BLOCKS if s % b == 0), None)


def block_for(q, kv, cache, *, platform: str, block: int | None = None, **_) -> int | None:
    """The block of slots the kernel reads for q [B, T, N, H] over kv [L, B, S, K, H], or None
    where the plain form must run (module docstring). Only T, S, H and the cache's type
    decide, none of which a mesh splits (decode_sharded.py asks before its shard_map)."""
    from llama_jax import model as model_lib  # noqa: PLC0415 (model imports backends)
    t, h, s = q.shape[1], q.shape[3], kv[0].shape[2]
    if not isinstance(cache, model_lib.LayerCache) or cache.pos is None or t > MAX_QUERIES:
        return None
    blk = block or (_tpu_block(s) if platform == "tpu" else GPU_BLOCK)
    if blk is None or s % blk or (platform == "gpu" and h & (h - 1)):
        return None
    return blk


def decode_attention(q, kv, cache, positions, segment_ids, *, platform: str,
                     interpret: bool = False, block: int | None = None, head=None):
    """Attention of q [B, T, N, H] over the cache after this call's write (kv: the stacked
    (k, v) [L, B, S, K, H]; cache: the model.LayerCache, for its layer and slot positions and
    segments): [B, T, N, H], or None where the plain form must run (module docstring).
    head: None, the N heads use the K kv heads in groups; else (an int32 scalar, maybe
    traced) all N use kv head `head` (one tensor rank's query heads, decode_sharded.py)."""
    blk = block_for(q, kv, cache, platform=platform, block=block)
    if blk is None:
        return None
    b, t, n, h = q.shape
    k, v = kv
    s, kh = k.shape[2], k.shape[3] if head is None else 1
    g = n // kh
    # rows r = g * T + t of kv head k: [B, K, G * T, H]
    qr = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    qpos, qseg = (jnp.tile(a.astype(jnp.int32), (1, g)) for a in (positions, segment_ids))
    last = jnp.max(jnp.where(segment_ids != 0, positions, -1), axis=1)  # [B]
    nblk = jnp.clip(-(-(jnp.minimum(last + 1, s)) // blk), 1, s // blk).astype(jnp.int32)
    where = jnp.stack([jnp.asarray(cache.layer, jnp.int32),
                       jnp.asarray(0 if head is None else head, jnp.int32)])
    if platform == "tpu":
        view = tpu_view(h, k.shape[3])
        k, v = (a.transpose(view) for a in (k, v))
        out = _tpu_call(qr, qpos[..., None], qseg[..., None], cache.pos[:, None],
                        cache.seg[:, None], k, v, nblk, where, blk, interpret, view,
                        head is not None)
    else:
        rp = max(16, 1 << (g * t - 1).bit_length())  # Triton's dot takes >= 16 rows
        pad = ((0, 0), (0, rp - g * t))
        out = _gpu_call(jnp.pad(qr, ((0, 0), (0, 0), (0, rp - g * t), (0, 0))),
                        jnp.pad(qpos, pad), jnp.pad(qseg, pad), cache.pos, cache.seg, k, v,
                        nblk, where, blk, interpret)[:, :, :g * t]
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.astype(q.dtype)


KERNELS = {"ragged_tpu": "tpu", "ragged_gpu": "gpu"}  # name -> the platform it compiles for


@functools.cache
def make(name: str, interpret: bool = False, block: int | None = None):
    """The Backend.decode_attention piece `name` (KERNELS); interpreted on a CPU."""
    return functools.partial(decode_attention, platform=KERNELS[name], interpret=interpret,
                             block=block)
