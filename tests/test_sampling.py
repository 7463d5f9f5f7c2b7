"""Sampling properties over random logits, checked against sets computed in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import sampling
from llama_jax.sampling import SamplingParams

B, V, DRAWS = 8, 64, 300


@pytest.fixture(scope="module")
def logits():
    return 3.0 * np.random.RandomState(0).randn(B, V).astype(np.float32)


def _draw(logits, params: SamplingParams, n=DRAWS, seed=0):
    """tokens [n, B] and logprobs [n, B] from n independent keys."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    fn = jax.jit(jax.vmap(lambda k: sampling.sample(jnp.asarray(logits), k, **params.arrays())))
    tokens, logprobs = fn(keys)
    return np.asarray(tokens), np.asarray(logprobs)


def _probs(logits, temperature=1.0):
    x = logits / temperature
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nucleus(probs, top_p):
    """Per row, the smallest top set with mass >= top_p (a token is in if the mass before it
    is < top_p)."""
    order = np.argsort(-probs, axis=-1)
    sp = np.take_along_axis(probs, order, -1)
    before = np.cumsum(sp, -1) - sp
    keep = np.zeros_like(probs, bool)
    np.put_along_axis(keep, order, before < top_p, -1)
    return keep


def _assert_within(tokens, allowed):
    rows = np.broadcast_to(np.arange(B), tokens.shape)
    assert allowed[rows, tokens].all(), "a token outside the allowed set was emitted"


def test_top_k_stays_in_top_k(logits):
    tokens, _ = _draw(logits, SamplingParams(temperature=1.0, top_k=5))
    top5 = np.zeros((B, V), bool)
    np.put_along_axis(top5, np.argsort(-logits, -1)[:, :5], True, -1)
    _assert_within(tokens, top5)
    assert len(np.unique(tokens[:, 0])) > 1  # it samples, not just argmax


def test_top_p_stays_in_nucleus(logits):
    tokens, _ = _draw(logits, SamplingParams(temperature=1.0, top_p=0.6))
    nucleus = _nucleus(_probs(logits), 0.6)
    _assert_within(tokens, nucleus)
    wide = nucleus.sum(-1) > 1
    assert wide.any() and any(len(np.unique(tokens[:, r])) > 1 for r in np.where(wide)[0])


def test_min_p_drops_unlikely_tokens(logits):
    tokens, _ = _draw(logits, SamplingParams(temperature=1.0, min_p=0.2))
    p = _probs(logits)
    _assert_within(tokens, p >= 0.2 * p.max(-1, keepdims=True))


def test_combined_filters_intersect(logits):
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05)
    tokens, _ = _draw(logits, params)
    top10 = np.zeros((B, V), bool)
    np.put_along_axis(top10, np.argsort(-logits, -1)[:, :10], True, -1)
    # top-p acts on the temperature-scaled distribution renormalised over the top 10.
    p = np.where(top10, _probs(logits, 0.7), 0.0)
    p = p / p.sum(-1, keepdims=True)
    allowed = top10 & _nucleus(p, 0.8) & (p >= 0.05 * p.max(-1, keepdims=True))
    _assert_within(tokens, allowed)


@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_temperature_to_zero_is_greedy(logits, temperature):
    tokens, _ = _draw(logits, SamplingParams(temperature=temperature), n=20)
    np.testing.assert_array_equal(tokens, np.broadcast_to(logits.argmax(-1), tokens.shape))


def test_same_seed_same_output_and_seeds_differ(logits):
    params = SamplingParams(temperature=1.0)
    a, _ = _draw(logits, params, n=20, seed=1)
    b, _ = _draw(logits, params, n=20, seed=1)
    c, _ = _draw(logits, params, n=20, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frequencies_follow_tempered_softmax(temperature):
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    tokens, _ = _draw(logits, SamplingParams(temperature=temperature), n=4000)
    freq = np.bincount(tokens[:, 0], minlength=4) / 4000
    np.testing.assert_allclose(freq, _probs(logits, temperature)[0], atol=0.03)


def test_logprobs_are_the_models_log_softmax(logits):
    """Whatever the filters, the log-probability is log-softmax of the raw logits."""
    tokens, logprobs = _draw(logits, SamplingParams(temperature=0.5, top_k=3), n=10)
    ref = np.log(_probs(logits))
    rows = np.broadcast_to(np.arange(B), tokens.shape)
    np.testing.assert_allclose(logprobs, ref[rows, tokens], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params, match", [
    (SamplingParams(temperature=-0.1), "temperature must be >= 0"),
    (SamplingParams(top_k=-1), "top_k must be in"),
    (SamplingParams(top_k=V + 1), "top_k must be in"),
    (SamplingParams(top_p=0.0), "top_p must be in"),
    (SamplingParams(top_p=1.5), "top_p must be in"),
    (SamplingParams(min_p=-0.5), "min_p must be in"),
    (SamplingParams(temperature=float("nan")), "temperature must be >= 0"),
])
def test_out_of_range_settings_are_rejected(params, match):
    with pytest.raises(ValueError, match=match):
        params.validate(V)
