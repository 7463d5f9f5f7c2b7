"""Reward model: scores equal transformers' LlamaForSequenceClassification on the same
weights, padding never changes a score, the export round-trips and is refused as an LM."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax import checkpoint, hf, reward
from llama_jax.model import Llama

from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

CONFIG = llama_jax.get_config("tiny", vocab_size=97, dim=32, n_layers=2, n_heads=4,
                              n_kv_heads=2, ffn_dim=64, max_seq_len=64, scan_layers=False)


@pytest.fixture(scope="module")
def model():
    m = reward.create(CONFIG, seed=1)
    m.score[...] = m.score[...] * 50  # spread the scores so that a wrong token shows
    return m


def _hf_classifier(model, tmp_path):
    """transformers' sequence classifier on the reward model's trunk and head (float64)."""
    lm = Llama(CONFIG, rngs=nnx.Rngs(0))
    params = {**reward.params_of(model), "lm_head": np.zeros((CONFIG.dim, CONFIG.vocab_size),
                                                             np.float32)}
    params.pop("score")
    nnx.update(lm, _state(lm, params))
    hf.save_hf(lm, str(tmp_path / "hf"))
    clf = transformers.LlamaForSequenceClassification.from_pretrained(
        str(tmp_path / "hf"), num_labels=1, torch_dtype=torch.float64).eval()
    clf.config.pad_token_id = 0
    with torch.no_grad():
        clf.score.weight.copy_(torch.tensor(np.asarray(model.score[...]))[None, :])
    return clf


def _state(lm, params):
    state = nnx.state(lm, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return state


def test_score_equals_transformers_classifier_at_the_last_token(model, tmp_path):
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, 97, n)) for n in (5, 17, 9)]
    ours = reward.score(model, rows)
    clf = _hf_classifier(model, tmp_path)
    theirs = [clf(torch.tensor([r])).logits[0, 0].item() for r in rows]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert np.ptp(ours) > 1e-2  # the rows score differently: the test can tell them apart
    # right padding of another width, given as an array with lengths: the same scores
    padded = np.full((3, 40), 7, np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    np.testing.assert_allclose(reward.score(model, padded, [len(r) for r in rows]), ours,
                               rtol=1e-6)


def test_export_round_trip_and_refused_as_language_model(model, tmp_path):
    out = reward.save(str(tmp_path / "rm"), model)
    assert reward.is_reward_checkpoint(out) and checkpoint.is_params_checkpoint(out)
    loaded = reward.load(out)
    assert isinstance(loaded, reward.RewardModel) and "lm_head" not in reward.params_of(loaded)
    rows = [[3, 4, 5], [6, 7, 8, 9]]
    np.testing.assert_array_equal(reward.score(loaded, rows), reward.score(model, rows))
    with pytest.raises(ValueError, match="reward model, not a language model"):
        llama_jax.load(out)
    lm = llama_jax.create(CONFIG)
    checkpoint.save_params(str(tmp_path / "lm"), lm)
    with pytest.raises(FileNotFoundError, match="not a reward model export"):
        reward.load(str(tmp_path / "lm"))


def test_from_lm_keeps_the_trunk_and_adds_a_head():
    lm_params = nnx.to_pure_dict(nnx.state(llama_jax.create(CONFIG, seed=2), nnx.Param))
    params = reward.from_lm(lm_params, CONFIG, seed=0)
    assert set(params) == set(lm_params) - {"lm_head"} | {"score"}
    assert params["score"].shape == (CONFIG.dim,)
    m = reward.merge(CONFIG, params)
    np.testing.assert_array_equal(np.asarray(m.embed[...]), np.asarray(lm_params["embed"]))
