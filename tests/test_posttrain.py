"""Post-training losses against transformers in float64 on the same tokens (SFT, DPO with
Llama 3's masking and NLL term), DPO's start at log 2 + 0.2·NLL, and the Bradley-Terry loss
against the reward model's own scores. The batches come from chat_data's pipelines with the
real Llama 3 tokenizer; the models are 2-layer ones over its 128,256 ids."""

import json
import os

import jax
import llama_models.llama3.tokenizer as meta_tok
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax import chat_data, data, hf, posttrain, reward, train
from llama_jax import tokenizer as tok_lib

from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

LLAMA3 = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
CONFIG = llama_jax.get_config("tiny", vocab_size=128256, dim=32, n_layers=2, n_heads=2,
                              n_kv_heads=1, ffn_dim=64, max_seq_len=128, scan_layers=False)
SEQ_LEN = 48


def spread(model, scale=40.0):
    """Output weights large enough that log-probs differ by token (the 0.02 init gives nearly
    uniform ones, which a loss over the wrong tokens would match as well)."""
    model.lm_head[...] = model.lm_head[...] * scale
    return model


def pairs_file(path, n=8):
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for i in range(n):
            good = " ".join(f"g{k}" for k in rng.integers(0, 50, rng.integers(1, 5)))
            bad = " ".join(f"b{k}" for k in rng.integers(0, 50, rng.integers(1, 7)))
            f.write(json.dumps({"prompt": [{"role": "system", "content": "Judge."},
                                           {"role": "user", "content": f"item {i}?"}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return str(path)


def sft_file(path, n=12):
    rng = np.random.default_rng(2)
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user", "content": f"q{i}"},
                     {"role": "assistant", "content": f"a{rng.integers(99)} b{i}"}]
            if i % 2:
                turns += [{"role": "user", "content": "more?"},
                          {"role": "assistant", "content": "no more."}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("posttrain")
    tok = tok_lib.load_tokenizer(LLAMA3)
    policy, ref = spread(llama_jax.create(CONFIG, seed=1)), spread(llama_jax.create(CONFIG, 2))
    hf_models = {}
    for name, m in (("policy", policy), ("ref", ref)):
        hf.save_hf(m, str(d / name))
        hf_models[name] = transformers.LlamaForCausalLM.from_pretrained(
            str(d / name), torch_dtype=torch.float64).eval()
    cfg = dict(seq_len=SEQ_LEN, data_dir=str(d / "tfds"), shuffle=False)
    sft = next(iter(chat_data.sft_dataset(data.DataConfig(
        name="sft", files=sft_file(d / "sft.jsonl"), global_batch=3, **cfg), tok, prefetch=0)))
    pref = next(iter(chat_data.preference_dataset(data.DataConfig(
        name="pref", files=pairs_file(d / "pairs.jsonl"), global_batch=4, **cfg), tok,
        prefetch=0)))
    return dict(tok=tok, policy=policy, ref=ref, hf=hf_models, sft=sft, pref=pref)


def _hf_logprobs(m, tokens):
    """log p(tokens[i + 1] | tokens[:i + 1]) for one sequence, float64 [n - 1]."""
    with torch.no_grad():
        logits = m(torch.tensor(np.asarray(tokens)[None])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    return logp[np.arange(len(tokens) - 1), np.asarray(tokens)[1:]]


def _segments(batch, key="segment_ids"):
    """(row, token indices) of every segment of a batch, and its tokens with its last target."""
    for r in range(batch["inputs"].shape[0]):
        for s in sorted(set(batch[key][r]) - {0 if key == "segment_ids" else -1}):
            at = np.flatnonzero(batch[key][r] == s)
            yield r, s, at, np.r_[batch["inputs"][r, at], batch["targets"][r, at[-1]]]


def _rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def test_sft_loss_equals_transformers_float64(setup):
    batch, m = setup["sft"], setup["hf"]["policy"]
    total, count = 0.0, 0
    for r, _, at, tokens in _segments(batch):
        logp = _hf_logprobs(m, tokens)  # the target after each input of the segment
        mask = batch["loss_mask"][r, at].astype(bool)
        total, count = total - logp[mask].sum(), count + mask.sum()
    assert count > 10
    graphdef, params = nnx.split(setup["policy"], nnx.Param)
    _, (ce, n) = train.loss_fn(params, graphdef, jax.tree.map(np.asarray, batch))
    assert int(n) == count
    assert _rel(ce / n, total / count) < 1e-5, (float(ce / n), total / count)


def _hf_sequence_logprobs(setup, batch, model):
    """{sequence id: (sum of log p over its response content tokens, their count, -sum)}."""
    if model in setup.setdefault("cache", {}):
        return setup["cache"][model]
    out = setup["cache"][model] = {}
    for r, s, at, tokens in _segments(batch, "sequence"):
        logp = _hf_logprobs(setup["hf"][model], tokens)
        mask = batch["loss_mask"][r, at].astype(bool)
        out[int(s)] = (logp[mask].sum(), mask.sum(), -logp[mask].sum())
    return out


def _hf_dpo(setup, batch, beta=0.1, nll_coef=0.2, ref="ref"):
    pi, rf = _hf_sequence_logprobs(setup, batch, "policy"), _hf_sequence_logprobs(setup, batch,
                                                                                   ref)
    pairs = len(pi) // 2
    h = np.array([beta * ((pi[2 * k][0] - rf[2 * k][0]) - (pi[2 * k + 1][0] - rf[2 * k + 1][0]))
                  for k in range(pairs)])
    dpo = np.mean(np.logaddexp(0.0, -h))  # -log sigmoid(h)
    nll = sum(pi[2 * k][2] for k in range(pairs)) / sum(pi[2 * k][1] for k in range(pairs))
    return dpo + nll_coef * nll, dpo, nll, h


def _ours_dpo(setup, ref):
    batch = jax.tree.map(np.asarray, setup["pref"])
    graphdef, params = nnx.split(setup["policy"], nnx.Param)
    ref_params = nnx.split(setup[ref], nnx.Param)[1]
    batch["ref_logprobs"] = posttrain.reference(graphdef, ref_params)(batch)
    loss, (_, metrics) = posttrain.dpo_objective(params, graphdef, batch, beta=0.1, nll_coef=0.2)
    return loss, metrics


def test_dpo_loss_equals_transformers_float64(setup):
    batch = setup["pref"]
    assert batch["inputs"].shape == (8, SEQ_LEN) and batch["sequence"].max() == 7
    loss, metrics = _ours_dpo(setup, "ref")
    want, dpo, nll, h = _hf_dpo(setup, batch)
    assert np.ptp(h) > 0.1 and abs(dpo - np.log(2)) > 0.01  # the reference matters here
    assert _rel(loss, want) < 1e-5, (float(loss), want)
    assert _rel(metrics["dpo_loss"], dpo) < 1e-5 and _rel(metrics["nll_loss"], nll) < 1e-5
    assert float(metrics["reward_accuracy"]) == np.mean(h > 0)
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(h), rtol=1e-4)


def test_dpo_with_policy_as_reference_starts_at_log2_plus_nll(setup):
    loss, metrics = _ours_dpo(setup, "policy")
    _, _, nll, _ = _hf_dpo(setup, setup["pref"], ref="policy")
    # the reference's log-probs come from another compiled program: equal to rounding
    assert float(metrics["dpo_loss"]) == pytest.approx(np.log(2), abs=1e-6)
    assert _rel(loss, np.log(2) + 0.2 * nll) < 1e-5


def test_bradley_terry_loss_uses_each_sequence_last_token(setup):
    batch = jax.tree.map(np.asarray, setup["pref"])
    rm = reward.create(CONFIG, seed=3)
    rm.score[...] = rm.score[...] * 50
    graphdef, params = nnx.split(rm, nnx.Param)
    loss, (n, metrics) = posttrain.reward_objective(params, graphdef, batch)
    rows = {int(s): list(tokens[:-1]) for _, s, _, tokens in _segments(batch, "sequence")}
    scores = reward.score(rm, [rows[k] for k in range(len(rows))])  # one row per sequence
    d = scores[0::2] - scores[1::2]
    assert int(n) == len(rows) == 8 and np.ptp(d) > 0.1
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -d)), rtol=1e-5)
    assert float(metrics["reward_accuracy"]) == np.mean(d > 0)
