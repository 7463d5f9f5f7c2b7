"""Tests of llama_jax/optim.py: schedule against its closed form, the weight-decay mask,
token-weighted accumulation against one big batch on the tiny model, and the fused CPU AdamW
update against optax's."""

import ctypes
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llama_jax
from llama_jax import optim
from llama_jax.backends.cpu import kernels as cpu_kernels
from llama_jax.backends.cpu import optim as cpu_optim
from llama_jax.model import logical_axes

CFG = optim.OptimConfig(peak_lr=2e-3, warmup_steps=10, total_steps=110)


@pytest.fixture(scope="module")
def model():
    return llama_jax.create(llama_jax.get_config("tiny"))


def _closed_form(step, peak=2e-3, warmup=10, total=110, end=0.1):
    if step < warmup:
        return peak * step / warmup
    frac = min(step - warmup, total - warmup) / (total - warmup)
    return end * peak + (peak - end * peak) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("step", [0, 5, 10, 60, 85, 110, 200])
def test_schedule_matches_closed_form(step):
    lr = float(optim.make_schedule(CFG)(step))
    assert lr == pytest.approx(_closed_form(step), rel=1e-5, abs=1e-12)


def test_schedule_landmarks():
    s = optim.make_schedule(CFG)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(2e-3)
    assert float(s(60)) == pytest.approx(0.55 * 2e-3)  # half way: mean of peak and 10% peak
    assert float(s(110)) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(optim.OptimConfig(warmup_steps=10, total_steps=10))


def _changed(model, cfg, params):
    """Which parameters one step with zero gradient moves (only weight decay can)."""
    tx = optim.make_optimizer(cfg, nnx.state(model, nnx.Param))

    @jax.jit
    def two_steps(params):
        state = tx.init(params)
        for _ in range(2):  # step 0 has learning rate 0
            updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        return optax.apply_updates(params, updates)
    return jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, two_steps(params))


def test_weight_decay_skips_norm_gains(model):
    params = nnx.state(model, nnx.Param).to_pure_dict()
    cfg = optim.OptimConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10)
    moved = _changed(model, cfg, params)
    assert moved["layers"]["mlp"]["w_up"] and moved["layers"]["attn"]["wq"]
    assert moved["lm_head"] and moved["embed"]
    assert not moved["norm"]["scale"] and not moved["layers"]["attn_norm"]["scale"]
    assert not moved["layers"]["mlp_norm"]["scale"]
    off = optim.OptimConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10,
                            decay_embeddings=False)
    moved = _changed(model, off, params)
    assert not moved["embed"] and moved["lm_head"]


def test_mask_from_axes_tree_equals_mask_from_params(model):
    params = nnx.state(model, nnx.Param)
    a = optim.decay_mask(params)(params)
    b = optim.decay_mask(logical_axes(model))(params.to_pure_dict())
    assert jax.tree.leaves(a) == jax.tree.leaves(b)
    with pytest.raises(KeyError, match="not among the parameters"):
        optim.decay_mask(params)({"extra": jnp.zeros(3)})


def _loss_sum(params, graphdef, batch):
    """Summed cross-entropy over masked target tokens, and their count."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


@pytest.mark.slow  # two compiles of the tiny model's gradient: ~10 s idle, ~20 s on a busy box
def test_accumulation_equals_one_big_batch(model):
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    b, t, v = 8, 12, model.config.vocab_size
    seg = np.where(np.arange(t)[None, :] < rng.integers(3, t, (b, 1)), 1, 2).astype(np.int32)
    seg[-1, 6:] = 0  # a padded row
    batch = dict(inputs=rng.integers(0, v, (b, t), dtype=np.int32),
                 targets=rng.integers(0, v, (b, t), dtype=np.int32),
                 positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)), segment_ids=seg,
                 # uneven token counts per row, so an unweighted mean of means would differ
                 loss_mask=(np.arange(t)[None, :] < rng.integers(1, t, (b, 1))).astype(np.int32))
    lg = jax.value_and_grad(lambda p, mb: _loss_sum(p, graphdef, mb), has_aux=True)
    run = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
    (loss1, tok1), g1 = run(lg, params, batch, 1)
    (loss4, tok4), g4 = run(lg, params, batch, 4)
    assert float(tok1) == float(tok4) == batch["loss_mask"].sum()
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-7), g4, g1)
    loss_only = jax.jit(lambda p, mb: _loss_sum(p, graphdef, mb))
    per_micro = [loss_only(params, jax.tree.map(lambda x: x[m::4], batch)) for m in range(4)]
    naive = np.mean([float(s) / float(n) for s, n in per_micro])
    assert abs(naive - float(loss1)) > 1e-4  # the weighting matters for this batch
    with pytest.raises(ValueError, match="does not split into 3 microbatches"):
        optim.accumulate_gradients(lg, params, batch, 3)


def _optax_step(tx, grads, ok, state, params):
    """train_step's update without the fused kernel: optax, applied, kept if not ok."""
    updates, new_state = tx.update(grads, state, params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa
    return keep(optax.apply_updates(params, updates), params), keep(new_state, state)


@pytest.mark.parametrize("clip_norm, build", [(1.0, "avx512"), (0.0, "avx512"),
                                               (1.0, "portable")],
                         ids=["clip", "no-clip", "portable"])
def test_fused_update_equals_optax(model, clip_norm, build, monkeypatch):
    """Five steps of the CPU kernel against optax on the tiny model's parameters: clipped and
    unclipped gradients, warmup and decay, decayed and undecayed (norm gain) parameters, and a
    skipped step that must change nothing. Equal within f32 rounding of one update. `portable`:
    the kernel built without AVX-512 (its plain C++ loop)."""
    if build == "portable":
        path = cpu_kernels._build(cpu_kernels._FLAGS + ("-mno-avx512f",),
                                  source=cpu_kernels._ADAMW_SOURCE)
        lib = ctypes.cdll.LoadLibrary(path)
        target = cpu_kernels._ADAMW + "_portable"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.AdamW), platform="cpu")
        monkeypatch.setattr(cpu_kernels, "_ADAMW", target)
    cfg = optim.OptimConfig(peak_lr=1e-2, warmup_steps=2, total_steps=6,
                            clip_norm=clip_norm)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    axes = logical_axes(model)
    tx, fused = optim.make_optimizer(cfg, axes), jax.jit(cpu_optim.fused_update(cfg, axes))
    assert cpu_optim.fused_applies(params)
    ref_p, ref_s = params, tx.init(params)
    got_p, got_s = params, tx.init(params)
    rng = np.random.default_rng(0)
    for i, scale in enumerate([0.01, 3.0, 0.02, 5.0, 0.05]):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale,
                                                   jnp.float32), params)
        norm, ok = optax.global_norm(grads), jnp.asarray(i != 2)
        before = (got_p, got_s)
        ref_p, ref_s = _optax_step(tx, grads, ok, ref_s, ref_p)
        got_p, got_s = fused(grads, norm, ok, got_s, got_p)
        if i == 2:  # skipped: bitwise unchanged, counts included
            jax.tree.map(np.testing.assert_array_equal, before, (got_p, got_s))
        assert jax.tree.structure(got_s) == jax.tree.structure(ref_s)
        for g, r in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((ref_p, ref_s))):
            scale = float(np.abs(np.asarray(r)).max()) or 1.0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-6,
                                       atol=1e-6 * scale)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got_p, params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter was updated


def test_fused_update_applies_only_to_local_f32_parameters(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert cpu_optim.fused_applies(params)
    assert not cpu_optim.fused_applies(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert not cpu_optim.fused_applies(params)


def test_fused_update_rejects_another_optimizers_state(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    update = cpu_optim.fused_update(CFG, logical_axes(model))
    with pytest.raises(TypeError, match="make_optimizer"):
        update(params, 1.0, True, optax.sgd(1e-3).init(params), params)
