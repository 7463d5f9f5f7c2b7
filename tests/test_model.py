"""The model against Hugging Face's PyTorch LlamaForCausalLM, and its properties."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax as lj
from llama_jax import hf, model as model_lib
from llama_jax.backends.cpu.dense import scale_rows

VOCAB = 256

# name -> LlamaConfig overrides; each is a random-init model built in the test.
HF_CASES = {
    "multi_head": dict(num_key_value_heads=4),
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "sharded": dict(num_key_value_heads=2),
}


def _hf_model(case):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
        **HF_CASES[case])
    torch.manual_seed(hash(case) % 1000)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits spread and matter
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return m


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_checkpoint(request, tmp_path_factory):
    m = _hf_model(request.param)
    d = str(tmp_path_factory.mktemp(request.param))
    m.save_pretrained(d, max_shard_size="40KB" if request.param == "sharded" else "1GB")
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = m(torch.tensor(tokens)).logits.numpy()
    return request.param, d, tokens, ref


def test_matches_hf_f32(hf_checkpoint):
    case, d, tokens, ref = hf_checkpoint
    if case == "sharded":
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    if case == "tied":
        assert "lm_head.weight" not in json.dumps(os.listdir(d))
    model = lj.load(d)
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_matches_hf_bf16_compute(hf_checkpoint):
    """f32 weights, bf16 compute: bf16 keeps 8 mantissa bits, so each matmul carries ~0.4%
    relative rounding; over 2 layers and the head we allow 3% of the logit range."""
    _, d, tokens, ref = hf_checkpoint
    model = lj.load(d, dtype="bfloat16")
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 3e-2 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_save_hf_roundtrip_loads_in_transformers(hf_checkpoint, tmp_path):
    _, d, tokens, ref = hf_checkpoint
    hf.save_hf(lj.load(d), str(tmp_path / "out"), max_shard_bytes=50_000)
    m = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        again = m(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_array_equal(again, ref)


def test_mismatched_checkpoint_names_tensor_and_shapes(tmp_path):
    m = _hf_model("multi_head")
    m.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 128
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(160, 64\).*\(128, 64\)"):
        lj.load(str(tmp_path))


def test_truncated_safetensors_named(tmp_path):
    _hf_model("multi_head").save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated: tensor .* ends at byte"):
        lj.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Properties, on the tiny preset.

TINY = lj.get_config("tiny-llama3")


@pytest.fixture(scope="module")
def tiny():
    return lj.create(TINY, seed=1)


def test_causality_gradients_exactly_zero(tiny):
    x = jax.random.normal(jax.random.key(0), (1, 12, TINY.dim))
    # jac[t, 0, s] = d(sum of position t's logits) / d(input s)
    jac = jax.jit(jax.jacrev(lambda x: tiny.from_embeddings(x)[0].sum(-1)))(x)
    norms = np.abs(np.asarray(jac[:, 0])).sum(-1)  # [T, T]
    for t in range(12):
        assert np.all(norms[t, t + 1:] == 0.0), (t, norms[t])
        assert np.all(norms[t, :t + 1] > 0.0), (t, norms[t])


def test_packed_row_equals_documents_alone(tiny):
    rng = np.random.RandomState(3)
    docs = [rng.randint(0, TINY.vocab_size, n) for n in (5, 7, 4)]
    row = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs])[None]
    packed = np.asarray(tiny(jnp.asarray(row), jnp.asarray(pos), jnp.asarray(seg)))
    start = 0
    for d in docs:
        alone = np.asarray(tiny(jnp.asarray(d[None])))
        np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5, rtol=0)
        start += len(d)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_unrolled_and_remat_agree(tiny, remat):
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, TINY.vocab_size, (2, 10)))
    graphdef, params = nnx.split(tiny)

    def loss(params, **overrides):
        m = nnx.merge(graphdef, params)
        m.config = m.config.replace(**overrides)
        return m(tokens).mean(), m(tokens)

    (l0, y0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (l1, y1), g1 = jax.jit(jax.value_and_grad(
        lambda p: loss(p, scan_layers=False, remat=remat), has_aux=True))(params)
    np.testing.assert_allclose(y0, y1, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_cache_matches_full_forward(tiny):
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, TINY.vocab_size, (2, 9)))
    full = np.asarray(tiny(tokens))
    cache = lj.init_cache(TINY, batch=2, max_len=16)
    logits, cache = tiny(tokens[:, :6], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(6, 9):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = tiny(tokens[:, t:t + 1], pos, jnp.ones((2, 1), jnp.int32), cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_every_parameter_has_logical_axes(tiny):
    axes = model_lib.logical_axes(tiny)
    shapes = nnx.state(tiny, nnx.Param)
    for names, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                           jax.tree.leaves(shapes)):
        assert len(names) == leaf.ndim and all(isinstance(n, str) for n in names)


def test_logits_shape_and_dtype_bf16_params():
    c = TINY.replace(param_dtype="bfloat16", dtype="bfloat16")
    m = lj.create(c)
    assert nnx.state(m, nnx.Param)["embed"][...].dtype == jnp.bfloat16
    out = m(jnp.zeros((3, 7), jnp.int32))
    assert out.shape == (3, 7, c.vocab_size) and out.dtype == jnp.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_gain_gradient_summed_in_f32(dtype):
    """scale_rows (the RMSNorm gain, custom VJP) has autodiff's value and gradients; in bf16
    the gain's gradient is the f32 sum of the products, not a bf16-rounded one."""
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(2, 40, 16)), dtype)
    scale = jnp.asarray(1 + 0.1 * rng.normal(size=16), jnp.float32)
    w = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    plain = lambda y, s: y * s.astype(y.dtype)[None, None, :]  # noqa: E731
    loss = lambda f: lambda y, s: jnp.sum(f(y, s).astype(jnp.float32) * w)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(scale_rows(y, scale), np.float32),
                                  np.asarray(plain(y, scale), np.float32))
    dy, ds = jax.grad(loss(scale_rows), argnums=(0, 1))(y, scale)
    ref_dy, ref_ds = jax.grad(loss(plain), argnums=(0, 1))(y, scale)
    np.testing.assert_array_equal(np.asarray(dy, np.float32), np.asarray(ref_dy, np.float32))
    assert ds.dtype == jnp.float32
    exact = np.einsum("btd,btd->d", np.asarray(w, np.float64).astype(y.dtype).astype(np.float64),
                      np.asarray(y, np.float64))
    np.testing.assert_allclose(np.asarray(ds), exact, rtol=1e-5, atol=1e-5)
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(ds), np.asarray(ref_ds), rtol=1e-5, atol=1e-5)
    else:  # autodiff rounds the bf16 products' sum to bf16: further from the exact sum
        assert np.abs(np.asarray(ds) - exact).max() < np.abs(np.asarray(ref_ds) - exact).max()
