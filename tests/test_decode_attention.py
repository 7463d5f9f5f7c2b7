"""Decode attention kernels (backends/decode_attention.py: ragged_tpu, ragged_gpu) equal the
plain attention over the cache with cache.mask, here in Pallas interpret mode (the same kernel
code); the seam (backends.get(..., decode_attention=...), model.self_attention) decodes the
same tokens; decode_plan.py's step analysis, and the TPU kernel compiled by Mosaic (libtpu)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import attention, backends, decode, decode_plan
from llama_jax import model as model_lib
from llama_jax.backends import decode_attention as da
from llama_jax.backends import decode_sharded

L, B, S, K, H, N, T = 2, 3, 256, 2, 16, 4, 2
BLOCKS = {"ragged_tpu": 128, "ragged_gpu": 64}  # two blocks of 128, four of 64 over S = 256


def _case(dtype, h=H):
    """Three rows, two queries each, over layer 1 of a 256-slot cache:
    row 0: three tokens, queries at 1 and 2 (one block of 128 read of two);
    row 1: document 1 at 0..99, document 2 at 100..139, queries of document 2 at 138, 139
      (slots of document 1 are visible by position but not by segment);
    row 2: slots 0..201 with a never-written gap at 50..59 (the length is not a multiple of
      the block), a query at 200 and a padding query (segment 0) at 201.
    V of row 0 past slot 128 (past its last block for both kernels' blocks) is NaN: a kernel
    that reads it returns NaN there."""
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((L, B, S, K, h)).astype(np.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, N, h)), dtype)
    pos, seg = np.full((B, S), -1, np.int32), np.zeros((B, S), np.int32)
    qpos, qseg = np.array([[1, 2], [138, 139], [200, 201]], np.int32), np.ones((B, T), np.int32)
    for row, n in enumerate((3, 140, 202)):
        pos[row, :n], seg[row, :n] = np.arange(n), 1
    seg[1, 100:140], qseg[1] = 2, 2
    pos[2, 50:60], seg[2, 50:60], qseg[2, 1] = -1, 0, 0
    v[:, 0, 128:] = np.nan
    k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    pos, seg, qpos, qseg = map(jnp.asarray, (pos, seg, qpos, qseg))
    mask = attention.attention_mask(qpos, qseg, pos, seg)
    cache = model_lib.LayerCache(k, v, 1, None, mask, pos, seg)
    return q, (k, v), cache, qpos, qseg


BOTH = ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2))


@pytest.mark.parametrize("name,h,dtypes", [("ragged_tpu", H, BOTH), ("ragged_gpu", H, BOTH),
                                           ("ragged_tpu", 128, BOTH[:1])],
                         ids=["tpu-slots-minor", "gpu", "tpu-row-major-f32"])
def test_kernel_equals_plain_attention_over_the_cache(name, h, dtypes, monkeypatch):
    """f32 within 1e-5, bf16 within bf16 rounding, on the real queries; padding queries get
    zeros; no NaN: the blocks past each row's length were never read. The TPU kernel reads a
    cache with H < 128 slots minor and one with H = 128 as it is (both layouts); the GPU
    kernel with one block per split, and (fewer programs) 2 splits of 2 and one split of 4
    blocks, whose loop carries the running softmax across blocks."""
    programs = (da.GPU_PROGRAMS, 12, 6) if name == "ragged_gpu" else (da.GPU_PROGRAMS,)
    for (dtype, tol), n in ((d, n) for d in dtypes for n in programs):
        monkeypatch.setattr(da, "GPU_PROGRAMS", n)  # read at trace time; each jit retraces
        q, kv, cache, qpos, qseg = _case(dtype, h)
        out = jax.jit(lambda q, kv, c: da.make(name, True, BLOCKS[name])(q, kv, c, qpos, qseg))(
            q, kv, cache)
        real = np.asarray(qseg != 0)[:, :, None, None]
        clean = jnp.where(jnp.isnan(kv[1]), 0, kv[1])  # the plain form reads every slot
        ref = attention.dot_product_attention(q, kv[0][1], clean[1], cache.mask)
        out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        assert not np.isnan(out).any()
        np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=tol)
        assert not np.where(real, 0, out).any()


@pytest.mark.parametrize("name,h", [("ragged_tpu", H), ("ragged_tpu", 128), ("ragged_gpu", H)],
                         ids=["tpu-slots-minor", "tpu-row-major", "gpu"])
def test_kernel_on_one_kv_head_of_the_cache(name, h):
    """head=1: all N query heads use kv head 1 of the cache (a tensor rank whose query heads
    share it, decode_sharded.py): the plain attention over that head alone, f32."""
    q, kv, cache, qpos, qseg = _case(jnp.float32, h)
    out = jax.jit(lambda q, kv, c, head: da.make(name, True, BLOCKS[name])(
        q, kv, c, qpos, qseg, head=head))(q, kv, cache, jnp.int32(1))
    clean = jnp.where(jnp.isnan(kv[1]), 0, kv[1])
    ref = attention.dot_product_attention(q, kv[0][1, :, :, 1:], clean[1, :, :, 1:], cache.mask)
    real = np.asarray(qseg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5)


@pytest.mark.parametrize("name", list(da.KERNELS))
def test_compiled_kernel_on_its_accelerator(name):
    """The kernel compiled (Mosaic / Triton) rather than interpreted, where its device is,
    over all kv heads and over one (head=1)."""
    if jax.default_backend() != da.KERNELS[name]:
        pytest.skip(f"needs a {da.KERNELS[name].upper()} (JAX_PLATFORMS={da.KERNELS[name]} "
                    f"pytest ...): the interpreted kernel is tested above on every machine")
    for dtype, head in ((jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, 1)):
        q, kv, cache, qpos, qseg = _case(dtype, 64)  # f32 dots there may pass through bf16
        fn = da.make(name, False, BLOCKS[name])
        out = jax.jit(lambda q, kv, c: fn(q, kv, c, qpos, qseg, head=head))(q, kv, cache)
        heads = slice(None) if head is None else slice(head, head + 1)  # head: kv head 1 only
        clean = jnp.where(jnp.isnan(kv[1]), 0, kv[1])
        ref = attention.dot_product_attention(*(a.astype(jnp.float32) for a in (
            q, kv[0][1, :, :, heads], clean[1, :, :, heads])), cache.mask)
        real = np.asarray(qseg != 0)[:, :, None, None]
        out = np.asarray(out, np.float32)
        assert not np.isnan(out).any()
        np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=3e-2)


def test_cases_the_kernel_leaves_to_the_plain_form():
    """None (the plain form runs) for a prefill, a cache length off the block, the paged cache
    type, and (GPU) a head dim that is not a power of two."""
    q, kv, cache, qpos, qseg = _case(jnp.float32)
    tpu, gpu = da.make("ragged_tpu", True), da.make("ragged_gpu", True)
    long_q = jnp.zeros((B, da.MAX_QUERIES + 1, N, H))
    wide = (jnp.zeros((L, B, S, K, 24)),) * 2
    assert tpu(long_q, kv, cache, *(jnp.zeros((B, da.MAX_QUERIES + 1), jnp.int32),) * 2) is None
    assert tpu(q, tuple(a[:, :, :192] for a in kv), cache, qpos, qseg) is None
    assert gpu(jnp.zeros((B, T, N, 24)), wide, cache, qpos, qseg) is None
    assert tpu(q, kv, tuple(cache), qpos, qseg) is None
    assert tpu(q, kv, cache, qpos, qseg) is not None


def test_selection_by_name():
    """auto is the plain form on a CPU; a kernel named on a CPU runs interpreted; a bad name
    says what is valid."""
    assert backends.get("plain").decode_attention is None
    assert backends.get("plain", decode_attention="ragged_gpu").decode_attention.keywords == dict(
        platform="gpu", interpret=True, block=None)
    with pytest.raises(ValueError, match="decode attention 'flash' cannot run on cpu; valid "
                                         "here: auto, plain, ragged_tpu, ragged_gpu"):
        backends.get("plain", decode_attention="flash")


@pytest.fixture(scope="module")
def tiny_f32():
    return lj.create(lj.get_config("tiny", dtype="float32", param_dtype="float32"), seed=3)


@pytest.mark.slow
def test_generate_with_the_kernel_equals_plain(tiny_f32):
    """Greedy decode of two prompts of different lengths over a 128-slot cache (buckets of 64
    prompt + 64 new tokens) gives the plain backend's tokens with the TPU kernel interpreted."""
    prompts = [[1, 5, 9, 2, 7], list(range(3, 43))]
    runs = []
    for name in ("plain", "ragged_tpu"):
        model = lj.with_backend(tiny_f32, backends.get("plain", decode_attention=name))
        runs.append(decode.generate(model, prompts, max_new_tokens=40, stop_ids=[]))
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-4)


@pytest.mark.slow
def test_generate_on_a_mesh_with_the_kernel_per_device_equals_one_device(tiny_f32):
    """Greedy decode on a data 2 x tensor 2 mesh (rows and kv heads split; the kernel inside
    decode_sharded's shard_map, interpreted) gives the plain single-device tokens, log-probs
    within 1e-5, with both kernels, and on tensor 4 over tiny's 2 kv heads (each rank reads
    the one its query heads share); the compiled step moves no cache-sized buffer between
    devices (the shard_map takes the cache's own sharding)."""
    prompts = [[1, 5, 9, 2, 7], list(range(3, 23)), [4, 4], [9]]
    ref = decode.generate(tiny_f32, prompts, max_new_tokens=6, stop_ids=[])
    for (data, tensor), name in [((2, 2), "ragged_tpu"), ((2, 2), "ragged_gpu"),
                                 ((1, 4), "ragged_tpu")]:
        mesh = decode.make_mesh(data, tensor)
        model = lj.with_backend(tiny_f32, backends.get("plain", decode_attention=name))
        weights = decode.prepare(decode.shard(model, mesh))
        assert weights.backend.decode_attention.func is decode_sharded.sharded_decode_attention
        step = str(jax.make_jaxpr(decode.decode_step)(*decode_plan.abstract_step_inputs(
            tiny_f32.config, weights.backend, 2, 256, mesh)))
        assert "pallas_call" in step and "shard_map" in step  # the kernel runs, per device
        out = decode.generate(weights, prompts, max_new_tokens=6, stop_ids=[], mesh=mesh)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    row = decode_plan.plan_decode(tiny_f32.config, "cpu", 2, 256, "ragged_tpu", data=2, tensor=2)
    assert row["cache_collectives"] == 0 and row["collectives"], row


def test_kernel_dropped_with_a_log_line_where_the_kv_heads_cannot_follow_tensor(
        tiny_f32, caplog):
    """tensor 3 over tiny's 2 kv heads: the plain form runs, and one log line names the
    setting (also on TPU for one kv head of a row-major cache); data 4 x tensor 1 keeps the
    kernel, per device."""
    model = lj.with_backend(tiny_f32, backends.get("plain", decode_attention="ragged_tpu"))
    with caplog.at_level(logging.INFO):
        weights = decode.prepare(decode.shard(model, decode.make_mesh(1, 3)))
    assert weights.backend.decode_attention is None
    assert "mesh tensor = 3 neither divides the 2 kv heads nor is a multiple" in caplog.text
    # a rank's one kv head of a row-major TPU cache (head dim 128) is a block Mosaic refuses
    wide, four = lj.get_config("tiny", dim=512, n_heads=4), decode.make_mesh(1, 4)
    assert "would need a block of one row of the cache's tiles" in decode_sharded.why_not(
        four, wide, "tpu")
    assert decode_sharded.why_not(four, wide, "gpu") is None
    kept = decode.prepare(decode.shard(model, decode.make_mesh(4, 1))).backend.decode_attention
    assert kept.func is decode_sharded.sharded_decode_attention
    assert decode.prepare(model).backend.decode_attention is model.backend.decode_attention


def test_scanned_layers_with_a_traced_layer_index(tiny_f32):
    """Llama.__call__ over a cache with the layers under lax.scan (the layer index traced):
    both kernels give the plain form's logits for a decode step after a padded prefill."""
    model = lj.with_backend(tiny_f32, backends.get("plain"))
    assert model.config.scan_layers
    toks, seg = jnp.asarray([[1, 5, 9, 2], [3, 4, 0, 0]]), jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    logits = []
    for name in ("plain", *da.KERNELS):
        m = lj.with_backend(model, backends.get("plain", decode_attention=name))
        _, cache = m(toks, pos, seg, cache=model_lib.init_cache(m.config, 2, 128))
        one = lambda c: m(jnp.asarray([[7], [8]]), jnp.asarray([[4], [2]]),  # noqa: E731
                          jnp.ones((2, 1), jnp.int32), cache=c)[0]
        assert ("pallas_call" in str(jax.make_jaxpr(one)(cache))) == (name != "plain")
        logits.append(np.asarray(one(cache)))
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], atol=1e-5)


def test_plan_decode_rejects_what_it_cannot_compile():
    """One sentence, before any compile, for an unknown decode attention and a GPU target."""
    c = lj.get_config("tiny")
    with pytest.raises(ValueError, match="unknown decode attention 'flash'; valid: plain, "):
        decode_plan.plan_decode(c, "cpu", 1, 256, "flash")
    with pytest.raises(ValueError, match="h200:1: decode steps compile for a TPU topology"):
        decode_plan.plan_decode(c, "h200:1", 1, 256, "plain")


def test_step_analysis_finds_cache_copies_and_roofline():
    """roofline_bytes counts every weight once (the model's parameter count; an untied
    embedding only its B rows) and the cache once; step_kernels
    counts kernels and finds a cache-sized copy but not an HBM->VMEM prefetch."""
    c = lj.get_config("tiny", dtype="bfloat16")
    n = model_lib.param_count(model_lib.abstract(c))
    cache = 2 * c.n_layers * 2 * 100 * c.n_kv_heads * c.head_dim
    table = 0 if c.tie_embeddings else c.vocab_size * c.dim  # the embedding is not read whole
    assert decode_plan.roofline_bytes(c, 2, 100) == 2 * (n - table + 2 * c.dim) + 2 * cache
    hlo = "\n".join([
        "ENTRY %main (p: bf16[2,1,256,2,16]) -> bf16[2,1,256,2,16] {",
        "  %p = bf16[2,1,256,2,16]{4,3,2,1,0} parameter(0)",
        "  %copy.1 = bf16[2,1,256,2,16]{2,4,3,1,0} copy(%p)",
        "  %copy-start.1 = (bf16[2,1,256,2,16]{2,4,3,1,0:S(1)}, bf16[2,1,256,2,16]{2,4,3,1,0}, "
        "u32[]) copy-start(%copy.1)",
        "  %copy-done.1 = bf16[2,1,256,2,16]{2,4,3,1,0:S(1)} copy-done(%copy-start.1)",
        "  %small = bf16[2,16]{1,0} copy(%p)",
        "  ROOT %fusion.1 = bf16[2,1,256,2,16]{4,3,2,1,0} fusion(%copy-done.1), kind=kLoop",
        "}"])
    got = decode_plan.step_kernels(hlo, 256 * 2 * 16 * 2)
    assert (got["kernels"], got["async_moves"], got["cache_copies"], got["cache_prefetches"]) \
        == (3, 2, 1, 1)
    assert got["cache_copy_bytes"] == 2 * 256 * 2 * 16 * 2
    assert (got["collectives"], got["cache_collectives"]) == ({}, 0)
    gathered = hlo.replace("%small = bf16[2,16]{1,0} copy(%p)",
                           "%small = bf16[2,16]{1,0} all-reduce(%p)\n  %ag = bf16[2,1,256,2,16]"
                           "{4,3,2,1,0} all-gather(%p), dimensions={3}")
    got = decode_plan.step_kernels(gathered, 256 * 2 * 16 * 2)
    assert (got["collectives"], got["cache_collectives"]) == (
        {"all-reduce": 1, "all-gather": 1}, 1)
    # per device on tensor 2 (everything tiny has divides by 2): the matrices and the cache
    # halve, the norms and the embedding's rows do not
    whole = 2 * (2 * c.n_layers * c.dim + c.dim + 2 * c.dim)
    assert decode_plan.roofline_bytes(c, 2, 100, tensor=2) == (
        (decode_plan.roofline_bytes(c, 2, 100) - whole) // 2 + whole)


def test_loop_copies_inside_the_body_and_outside():
    """loop_cache_copies tells a copy in the while body (every token) from one in the entry
    computation (once per generate call)."""
    hlo = "\n".join([
        "%body (s: bf16[1,256,2,16]) -> bf16[1,256,2,16] {",
        "  %s = bf16[1,256,2,16]{3,2,1,0} parameter(0)",
        "  ROOT %copy.2 = bf16[1,256,2,16]{3,1,2,0} copy(%s)",
        "}",
        "%cond (c: bf16[1,256,2,16]) -> pred[] {",
        "  %c = bf16[1,256,2,16]{3,2,1,0} parameter(0)",
        "  ROOT %t = pred[] constant(true)",
        "}",
        "ENTRY %main (p: bf16[1,256,2,16]) -> bf16[1,256,2,16] {",
        "  %p = bf16[1,256,2,16]{3,2,1,0} parameter(0)",
        "  %copy.1 = bf16[1,256,2,16]{3,1,2,0} copy(%p)",
        "  %copy.3 = bf16[1,256,2,16]{3,1,2,0} copy(%copy.1)",
        "  ROOT %w = bf16[1,256,2,16]{3,2,1,0} while(%copy.3), condition=%cond, body=%body",
        "}"])
    assert decode_plan.loop_cache_copies(hlo, 256 * 2 * 16 * 2) == dict(
        loop_body_cache_copies=1, loop_entry_cache_copies=2)


@pytest.mark.slow
def test_tpu_kernel_compiles_with_mosaic_and_the_cache_is_not_copied():
    """The decode step of a tiny bf16 model compiled for a TPU v5e by libtpu (Mosaic compiles
    the kernel) in each of decode_attention.tpu_view's three cases (head dim 16; head dim 128
    with one kv head, and with two): a kernel call per layer, and no copy of cache size: the
    cache is written in place and read in the layout XLA gave it."""
    pytest.importorskip("libtpu", reason="TPU targets compile with libtpu (the plan extra); "
                                         "CI does not install it")
    for dims in (dict(), dict(dim=256, n_heads=2, n_kv_heads=1),
                 dict(dim=512, n_heads=4, n_kv_heads=2)):
        c = lj.get_config("tiny", dtype="bfloat16", param_dtype="bfloat16", **dims)
        row = decode_plan.plan_decode(c, "v5e:2x2", 1, 512, "ragged_tpu")
        assert row["by_opcode"]["custom-call"] >= c.n_layers
        assert row["cache_copies"] == 0, row
        assert row["bytes_per_step"] > 0 and row["predicted_tokens_s"] > 0


@pytest.mark.slow
def test_tpu_decode_step_on_a_tensor_mesh_reads_the_cache_where_it_lies():
    """The decode step of a tiny bf16 model compiled by libtpu for a v5p 2x2x1 with tensor 4,
    with 4 kv heads (one per chip; head dim 16 and 128, tpu_view's layouts) and 2 (each chip
    keeps both and reads the one its query heads share): the kernel per layer, per device,
    no cache-sized copy and no collective as large as a layer's cache shard (the shard_map
    takes the cache's own sharding; Mosaic refuses to be partitioned automatically)."""
    pytest.importorskip("libtpu", reason="TPU targets compile with libtpu (the plan extra); "
                                         "CI does not install it")
    for dims in (dict(n_kv_heads=4), dict(dim=512, n_heads=4, n_kv_heads=4), dict()):
        c = lj.get_config("tiny", dtype="bfloat16", param_dtype="bfloat16", **dims)
        row = decode_plan.plan_decode(c, "v5p:2x2x1", 1, 512, "ragged_tpu", tensor=4)
        assert row["by_opcode"]["custom-call"] >= c.n_layers, row
        assert row["cache_copies"] == 0 and row["cache_collectives"] == 0, row


def test_gpu_kernel_lowers_to_triton():
    """ragged_gpu lowered for CUDA on this machine (no GPU needed): Pallas emits the Triton
    kernel call, so what the GPU compiles is the kernel tested interpreted above."""
    from jax import export
    q, kv, cache, qpos, qseg = _case(jnp.bfloat16)
    fn = jax.jit(lambda q, kv, c, p, s: da.make("ragged_gpu")(q, kv, c, p, s))
    triton = "__gpu$xla.gpu.triton"
    lowered = export.export(fn, platforms=("cuda",), disabled_checks=[
        export.DisabledSafetyCheck.custom_call(triton)])(q, kv, cache, qpos, qseg)
    assert lowered.mlir_module().count(triton) == 1


def test_cpu_decode_step_updates_the_cache_in_place():
    """The plain decode step compiled for this CPU (as CI runs it) copies no buffer the size
    of the whole cache: the write goes into the donated cache in place. (Four layers: XLA:CPU
    does copy each layer's K, transposed and in f32, for its dot, half the cache's bytes.)"""
    c = lj.get_config("tiny", dtype="bfloat16", param_dtype="bfloat16", n_layers=4)
    compiled = decode_plan.compile_step(c, backends.PLAIN, 1, 1024, jax.devices()[0])
    cache = 2 * c.n_layers * 1024 * c.n_kv_heads * c.head_dim  # bf16 k: [L, 1, 1024, K, H]
    got = decode_plan.step_kernels(compiled.as_text(), cache)
    assert got["cache_copies"] == 0 and got["kernels"] > 0
