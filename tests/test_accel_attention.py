"""Accelerator attention kernels (backends/tpu.py splash, backends/gpu.py Pallas GPU flash)
equal the reference attention: here on the CPU in Pallas interpret mode (the same kernel
code), forward and gradients, packed rows, padding, GQA, bf16, context-parallel chunks, and
the tiny model's training losses on one device and on a data 2 x context 2 x tensor 2 mesh."""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax import attention, backends, lora, model, pipeline_manual, sharding, train
from llama_jax.backends import sharded, tpu

import mesh_setup
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture

KERNELS = ("splash", "pallas_gpu")


def _inputs(t, dtype=jnp.float32, b=2, n=4, kh=2, h=64):
    """Two rows whose second document starts mid-block (tokens 50 and 200), padding at the
    end of row 1, GQA with two query heads per kv head."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype)
               for heads in (n, kh, kh))
    idx = np.arange(t)[None, :]
    split = np.array([[50], [min(200, t - 20)]])
    seg = np.where(idx < split, 1, 2).astype(np.int32)
    seg[1, -7:] = 0
    pos = np.where(idx < split, idx, idx - split).astype(np.int32)
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, pos, seg):
    """(the live queries' outputs, gradients of a weighted sum of them): padding queries are
    never read by the loss, and the weights give every live output its own gradient."""
    live = (seg != 0)[:, :, None, None]
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape) * live
    out = lambda q, k, v: jnp.where(live, fn(q, k, v, pos, seg), 0)  # noqa: E731
    loss = lambda q, k, v: jnp.sum(out(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(out)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                 jnp.linalg.norm(b.astype(jnp.float32)))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("t", [256, 328], ids=["t256", "t328-padded"])
def test_kernel_equals_reference_value_and_gradients(name, t):
    """f32: documents starting mid-block, GQA; t=328 is padded to 384 inside (3 x 3 blocks of
    128, the second document starting inside the second) and sliced."""
    fn = backends.kernel_attention(name)
    args = _inputs(t)
    value, grads = _value_and_grads(fn, *args)
    ref_value, ref_grads = _value_and_grads(attention.reference_attention, *args)
    assert _rel(value, ref_value) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-5


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_bf16_close_to_f32_reference(name):
    """bf16 inputs: within bf16 rounding of the f32 reference (the pre-scaled queries and the
    bf16 probabilities round differently from the reference's, so not bit-equal)."""
    q, k, v, pos, seg = _inputs(256, jnp.bfloat16)
    out = backends.kernel_attention(name)(q, k, v, pos, seg)
    assert out.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    ref = attention.reference_attention(*f32, pos, seg)
    live = (seg != 0)[:, :, None, None]
    assert _rel(jnp.where(live, out, 0), jnp.where(live, ref, 0)) < 1e-2


@pytest.mark.parametrize("name,platform", [("splash", "tpu"), ("pallas_gpu", "gpu")])
def test_compiled_kernel_on_its_accelerator(name, platform):
    """The kernel compiled (Mosaic / Triton) rather than interpreted, where its device is."""
    if jax.default_backend() != platform:
        pytest.skip(f"needs a {platform.upper()} (JAX_PLATFORMS={platform} pytest ...): the "
                    f"interpreted kernel is tested above on every machine")
    for dtype, tol in ((jnp.float32, 2e-2), (jnp.bfloat16, 2e-2)):  # TPU/GPU f32 dots: bf16 passes
        q, k, v, pos, seg = _inputs(1024, dtype)
        out, grads = _value_and_grads(backends.kernel_attention(name), q, k, v, pos, seg)
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        ref, ref_grads = _value_and_grads(attention.reference_attention, *f32, pos, seg)
        assert _rel(out, ref) < tol
        for g, r in zip(grads, ref_grads):
            assert _rel(g, r) < tol


def test_splash_under_context_parallelism_follows_true_positions():
    """4 context ranks, keys gathered in the load-balanced order: each rank's chunks i and
    7-i mask by their true offsets (value and gradients equal the unsharded reference)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4, 1))
    q, k, v, pos, seg = _inputs(512)
    order = np.asarray(attention.load_balance_order(512, 4))
    inverse = np.argsort(order)
    local = backends.kernel_attention("splash")

    def cp(q, k, v, pos, seg):  # the caller's token order in and out
        p = lambda a: a[:, order]  # noqa: E731
        out = sharded.sharded_attention(p(q), p(k), p(v), p(pos), p(seg), mesh=mesh,
                                        local=local, context_impl="all_gather")
        return out[:, inverse]
    with jax.set_mesh(mesh):
        value, grads = _value_and_grads(cp, q, k, v, pos, seg)
    ref_value, ref_grads = _value_and_grads(attention.reference_attention, q, k, v, pos, seg)
    assert _rel(value, ref_value) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-5


def test_names_platforms_and_bad_shapes(monkeypatch):
    assert backends.get("cpu", "splash").attention.func is tpu.splash_attention
    assert backends.get("plain", "pallas_gpu").name == "plain"
    # a plan (plan.build compiles with `auto`) of a non-kernel attention keeps it
    assert (backends.for_target("gpu", "chunked").with_attention("auto").attention
            is attention.chunked_attention)
    with pytest.raises(ValueError, match="The tpu backend needs JAX's TPU platform but this "
                                         "process runs on cpu.*mesh.attention=splash"):
        backends.get("tpu")
    with pytest.raises(ValueError, match="a Pallas attention kernel needs mesh.tensor = 4"):
        sharded.check(8, 3, 4)
    with pytest.raises(ValueError, match="needs each rank's 64-token chunk to be a multiple "
                                         "of 128; choose data.seq_len a multiple of 128 x "
                                         "mesh.context = 256"):
        tpu.splash_attention(jnp.zeros((1, 64, 2, 8)), *(jnp.zeros((1, 128, 2, 8)),) * 2,
                             jnp.zeros((1, 64), jnp.int32),
                             jnp.ones((1, 64), jnp.int32), jnp.zeros((1, 128), jnp.int32),
                             jnp.ones((1, 128), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="batch of 6 rows does not split into 2 pipeline "
                                         "microbatches x data = 2 with a kernel attention"):
        pipeline_manual.check(6, 2, 2, 128, 2)
    with pytest.raises(ValueError, match="100 tokens per context rank do not split over "
                                         "tensor = 8 with a kernel attention in pipeline"):
        pipeline_manual.check(8, 2, 2, 100, 8)
    with pytest.raises(ValueError, match="704 ffn_dim units do not split over tensor = 3 with a "
                                         "kernel attention in pipeline stages"):
        pipeline_manual.check(12, 2, 2, 96, 3, n_heads=6, ffn_dim=704)
    with pytest.raises(ValueError, match="pallas_gpu needs a power-of-two head dim"):
        backends.kernel_attention("pallas_gpu")(*(jnp.zeros((1, 128, 2, 96)),) * 3,
                                                *(jnp.ones((1, 128), jnp.int32),) * 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    backends.get.cache_clear()
    try:
        assert backends.get("auto").name == "gpu"
        assert backends.get("auto").default_attention == "pallas_gpu"
        with pytest.raises(ValueError, match="mesh.attention='splash' is a TPU kernel but this "
                                             "process runs on gpu; valid here: auto, "
                                             "reference, chunked, pallas_gpu"):
            backends.get("gpu", "splash")
    finally:
        backends.get.cache_clear()


# ----------------------------------------------------------------------------------------------
# The check: two training steps of the tiny model with head dim 128 (tiny.py with
# n_heads=2, n_kv_heads=1, n_layers=2, global_batch=4, 256-token rows), splash vs reference.

CFG = lj.get_config("tiny", vocab_size=259, dim=256, n_layers=2, n_heads=2, n_kv_heads=1,
                    ffn_dim=704, max_seq_len=256, dtype="float32")


def _losses(mesh_sizes=None, attention_name="reference"):
    """(losses of two training steps, host parameters after them, the gradients' global norms
    before clipping: a gradient off by a constant factor moves AdamW's first steps alike)."""
    s, state, params = mesh_setup.make_step(CFG)
    data = mesh_setup.batches(2, b=4, t=256)
    if mesh_sizes is None:  # one device, no mesh: the kernel in the plain model
        graphdef = nnx.split(lj.create(CFG, backend=backends.get("plain", attention_name)),
                             nnx.Param)[0]
        step = jax.jit(lambda st, b: train.train_step.__wrapped__(
            st, b, dataclasses.replace(s, graphdef=graphdef)))
        put, ctx = (lambda b: jax.tree.map(jnp.asarray, b)), contextlib.nullcontext()
        state = jax.tree.map(jnp.asarray, state)
    else:
        mc = sharding.MeshConfig(*mesh_sizes, backend="plain", attention=attention_name)
        mesh = sharding.make_mesh(mc)
        state = jax.device_put(state, sharding.state_shardings(state, params, mesh, mc.fsdp))
        step = sharding.jit_step(mesh_setup.step_fn(s, mesh, mc, backends.PLAIN, CFG),
                                 mesh, mc, state, params)
        put, ctx = (lambda b: sharding.shard_batch(b, mesh)), jax.set_mesh(mesh)
    losses, norms = [], []
    with ctx:
        for b in data:
            state, metrics = step(state, put(b))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
    return losses, jax.tree.map(np.asarray, state.params), norms


@pytest.fixture(scope="module")
def reference_run():
    return _losses()


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [None, (2, 1, 2, 2)], ids=["one-device", "d2-c2-t2"])
def test_tiny_training_with_splash_equals_reference(reference_run, mesh_sizes):
    losses, _, norms = _losses(mesh_sizes, "splash")
    reference_losses = reference_run[0]
    assert reference_losses[1] != reference_losses[0]  # the second step saw the first update
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, reference_run[2], rtol=1e-5)


# Pipeline stages with a kernel (llama_jax/pipeline_manual.py: one shard_map manual over every
# axis, Megatron's psum after wo and w_down, the kv head chosen per tensor rank since K = 1).

@pytest.mark.parametrize("name,mesh_sizes", [
    ("splash", (2, 2, 1, 2)), ("splash", (2, 2, 2, 1)), ("pallas_gpu", (2, 2, 1, 2))],
    ids=["splash-d2-p2-t2", "splash-d2-p2-c2", "pallas_gpu-d2-p2-t2"])
def test_kernel_in_pipeline_stages_equals_reference(reference_run, name, mesh_sizes):
    """Two training steps: losses, the gradients' norms and the parameters after them (the
    gathered weights' gradients summed over data, the replicated ones' over tensor) equal one
    device's reference attention. (pallas_gpu runs chunked under context parallelism, so its
    case keeps context 1: the kernel itself in the stages.)"""
    losses, params, norms = _losses(mesh_sizes, name)
    np.testing.assert_allclose(losses, reference_run[0], rtol=1e-5)
    np.testing.assert_allclose(norms, reference_run[2], rtol=1e-5)
    assert mesh_setup.rel(params, reference_run[1]) <= 1e-5


@pytest.mark.slow
def test_kernel_in_circular_pipeline_with_kv_heads_split():
    """The circular schedule (R 2, M 4) with splash on data 2 x pipeline 2 x tensor 2, on the
    mesh tests' model (K 2 kv heads split over tensor, 16-token rows padded to 128 inside):
    equal to one device."""
    mc = sharding.MeshConfig(2, 2, 1, 2, repeats=2, pipeline_microbatches=4, attention="splash")
    losses, params, _ = mesh_setup.run_sharded(mc, steps=2)
    ref_losses, ref_params = mesh_setup.reference()
    np.testing.assert_allclose(losses, ref_losses[:2], rtol=1e-5)
    assert mesh_setup.rel(params[1], ref_params[1]) <= 1e-5


@pytest.mark.slow
def test_lora_adapters_in_kernel_pipeline_stages():
    """LoRA A/B follow their weight's split inside the manual stages (wo's and w_down's
    low-rank terms are partial sums too): the pipelined layers' value and gradients (weights,
    adapters, input) equal the plain layer loop with the reference attention."""
    llama = lora.attach(lj.create(CFG), lora.LoraConfig(rank=4))
    for i, adapter in enumerate(lora.adapters_of(llama).values()):  # B = 0 would hide A
        adapter.b[...] = 0.02 * jax.random.normal(jax.random.key(i), adapter.b.shape)
    b = mesh_setup.batches(1, b=4, t=256)[0]
    pos, seg = jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
    x = llama.embed_tokens(jnp.asarray(b["inputs"]))
    graphdef, state = nnx.split(llama)
    mc = sharding.MeshConfig(2, 2, 1, 2)
    mesh = sharding.make_mesh(mc)

    def plain(state, x):
        m = nnx.merge(graphdef, state)
        return model.forward_layers(m.config, m.backend, nnx.state(m.layers), x, pos, seg)[0]

    def piped(state, x):
        return pipeline_manual.pipeline_layers(
            nnx.merge(graphdef, state), x, pos, seg, mesh=mesh,
            local_attention=backends.kernel_attention("splash"),
            weight_spec=functools.partial(sharding.spec, mesh=mesh, fsdp=False))

    live = (seg != 0)[:, :, None]  # padding queries' outputs differ (tpu.py) and go unread
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape) * live
    value_grad = lambda f: jax.value_and_grad(lambda s, x: jnp.sum(f(s, x) * w), (0, 1))  # noqa
    ref = jax.jit(value_grad(plain))(state, x)
    with jax.set_mesh(mesh):
        got = jax.jit(value_grad(piped))(state, x)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    assert mesh_setup.rel(got[1], ref[1]) <= 1e-5
