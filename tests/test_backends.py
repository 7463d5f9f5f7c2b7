"""Backends: the cpu backend equals the plain math; choosing one; the core never imports it."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax as lj
from llama_jax import backends, optim, train
from llama_jax.backends.cpu import kernels as cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lj.get_config("tiny", n_layers=2, dim=64, n_heads=2, n_kv_heads=1, ffn_dim=192,
                    vocab_size=96, max_seq_len=256)


def test_importing_and_building_the_model_loads_no_cpu_backend_module():
    """A TPU/GPU reader's path: importing llama_jax (model, train, decode) and running a model
    touches nothing of backends/cpu."""
    code = ("import sys, jax.numpy as jnp, llama_jax, llama_jax.train, llama_jax.decode\n"
            "m = llama_jax.create(llama_jax.get_config('tiny', n_layers=1))\n"
            "m(jnp.ones((1, 4), jnp.int32))\n"
            "print(sorted(n for n in sys.modules if n.startswith('llama_jax.backends.cpu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_names_and_errors(monkeypatch, caplog):
    with pytest.raises(ValueError, match="unknown backend 'tpu9'; valid: auto, plain, cpu, "
                                         "tpu, gpu"):
        backends.get("tpu9")
    with pytest.raises(ValueError, match="mesh.attention='flash3' is not available on the cpu "
                                         "backend; valid: auto, reference, chunked, full, "
                                         "splash, pallas_gpu"):
        backends.get("cpu", "flash3")
    assert backends.get("plain").name == "plain"
    assert backends.get("auto").name == "cpu"  # the tests run on JAX's CPU platform
    # elsewhere: cpu refused in one sentence, auto picks that platform's backend with one log line
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    backends.get.cache_clear()
    try:
        with pytest.raises(ValueError, match="cpu backend needs JAX's CPU platform"):
            backends.get("cpu")
        with caplog.at_level(logging.INFO):
            assert backends.get("auto").name == "gpu"
        assert "backend auto: gpu (JAX platform gpu)" in caplog.text
    finally:
        backends.get.cache_clear()


def _batch(t, seed=0, b=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (b, t + 1), dtype=np.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, t // 3:] = 2  # two documents in row 1
    seg[1, -5:] = 0  # and padding
    idx = np.arange(t)
    pos = np.tile(idx, (b, 1)).astype(np.int32)
    pos[1] = np.where(idx >= t // 3, idx - t // 3, idx)
    return dict(inputs=ids[:, :-1], targets=ids[:, 1:], positions=pos, segment_ids=seg,
                loss_mask=(seg != 0).astype(np.int32))


def _loss_and_grads(backend, dtype, t):
    config = CFG.replace(dtype=dtype)
    graphdef, params = nnx.split(lj.create(config, backend=backend), nnx.Param)
    batch = jax.tree.map(jnp.asarray, _batch(t))
    fn = jax.jit(jax.value_and_grad(lambda p: train.loss_fn(p, graphdef, batch)[0]))
    params = nnx.to_pure_dict(params)
    return (*fn(params), fn.lower(params).as_text())


@pytest.mark.parametrize("dtype, t", [("float32", 64), ("float32", 256), ("bfloat16", 256)])
def test_cpu_backend_equals_plain(dtype, t):
    """Loss and gradients of the cpu backend (custom-VJP products, f32 gain gradients, causal
    query blocks at 256 tokens, the C++ attention and SwiGLU kernels in bf16) against the
    plain math on packed rows with padding: f32 within float32 rounding, bf16 within bf16's."""
    loss_p, grads_p, hlo_p = _loss_and_grads(backends.PLAIN, dtype, t)
    loss_c, grads_c, hlo_c = _loss_and_grads(backends.get("cpu"), dtype, t)
    # the cpu pieces really ran (a backend that fell back to the plain math would pass below):
    # its RoPE table and causal blocks sit behind conditionals, its bf16 attention is a kernel
    assert "stablehlo.case" in hlo_c and "stablehlo.case" not in hlo_p
    if dtype == "bfloat16" and cpu_kernels.attention_available():
        assert cpu_kernels._ATTENTION_FORWARD in hlo_c
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=tol)
    flat_p = dict(jax.tree_util.tree_leaves_with_path(grads_p))
    for path, g in jax.tree_util.tree_leaves_with_path(grads_c):
        r = np.asarray(flat_p[path], np.float32)
        err = np.linalg.norm(np.asarray(g, np.float32) - r) / max(np.linalg.norm(r), 1e-30)
        assert err <= (1e-4 if dtype == "float32" else 5e-2), (jax.tree_util.keystr(path), err)


def test_cpu_fused_update_equals_plain_train_step():
    """Three train steps with the cpu backend (its fused AdamW included) repeat the plain
    backend's losses and parameters within f32 rounding."""
    results = []
    for backend in (backends.PLAIN, backends.get("cpu")):
        graphdef, params = nnx.split(lj.abstract(CFG, backend), nnx.Param)
        ocfg = optim.OptimConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10)
        tx = optim.make_optimizer(ocfg, params)
        fused = backend.fused_update and backend.fused_update(ocfg, params)
        assert (fused is not None) == (backend.name == "cpu")
        s = train.Step(graphdef, tx, optim.make_schedule(ocfg), fused_update=fused)
        state = train.init_state(train.init_params(CFG, 0), tx)
        losses = []
        for i in range(3):
            state, m = train.train_step(state, jax.tree.map(jnp.asarray, _batch(64, i)), s)
            losses.append(float(m["loss"]))
        results.append((losses, jax.tree.map(np.asarray, state.params)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
