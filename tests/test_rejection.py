"""Rejection sampling: K samples per prompt from the decode loop, scored by the reward model;
the kept response is the best of its prompt (scores recomputed here from the Llama 3 chat
format by hand) and is SFT data; the tool's one-line refusals. The tool's output file is
checked end to end in test_post_training_round."""

import json
import os
import shutil

import llama_models.llama3.tokenizer as meta_tok
import numpy as np
import pytest

import llama_jax
from llama_jax import chat_data, hf, rejection, reward
from llama_jax import tokenizer as tok_lib
from llama_jax.sampling import SamplingParams
from tools import rejection_sample

from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

LLAMA3 = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
CONFIG = llama_jax.get_config("tiny", vocab_size=128256, dim=32, n_layers=1, n_heads=2,
                              n_kv_heads=1, ffn_dim=64, max_seq_len=128, scan_layers=False)
N, NEW = 4, 6
PROMPTS = [[{"role": "user", "content": "Name a colour."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye?"}]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rejection")
    hf.save_hf(llama_jax.create(CONFIG, seed=1), str(d / "policy"))
    shutil.copyfile(LLAMA3, d / "policy" / "tokenizer.model")
    reward.save(str(d / "rm"), reward.create(CONFIG, seed=2), tokenizer_path=LLAMA3)
    with open(d / "prompts.jsonl", "w") as f:
        f.write(json.dumps({"messages": PROMPTS[0]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "assistant", "content": "no"}]}) + "\n")
        for p in PROMPTS[1:]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return d


@pytest.fixture(scope="module")
def loaded(setup):
    """(tokenizer, reward model, policy, prompts), loaded once: both runs share compilations."""
    prompts = rejection.read_prompts(str(setup / "prompts.jsonl"))
    assert [line for line, _ in prompts] == [1, 3, 4]  # line 2 (no user turn) skipped
    return (tok_lib.load_tokenizer(LLAMA3), reward.load(str(setup / "rm")),
            llama_jax.load(str(setup / "policy")), prompts)


def _results(loaded, keep_unfinished):
    tok, rm, policy, prompts = loaded
    return tok, rm, list(rejection.best_of_n(
        policy, rm, tok, prompts, n=N, max_new_tokens=NEW, sampling=SamplingParams(1.0),
        batch_rows=8, keep_unfinished=keep_unfinished))


@pytest.mark.slow
def test_kept_response_is_the_best_of_its_prompt(loaded):
    tok, rm, results = _results(loaded, keep_unfinished=True)
    assert len(results) == len(PROMPTS)
    for r, messages in zip(results, PROMPTS):
        assert r.messages == messages and len(r.texts) == N and len(set(r.texts)) > 1
        # Each sample's reward by hand: the open assistant header + its content + <|eot_id|>.
        rows = [tok.encode_dialog(messages) + tok.encode(t, bos=False, eos=False) + [tok.eot_id]
                for t in r.texts]
        scores = reward.score(rm, rows, pad_id=tok.pad_id).tolist()
        np.testing.assert_allclose(r.scores, scores, rtol=1e-5, atol=1e-6)
        assert r.best == {"messages": messages + [
            {"role": "assistant", "content": r.texts[int(np.argmax(scores))]}],
            "score": pytest.approx(max(scores), rel=1e-5, abs=1e-6)}
        example, why = chat_data.parse(json.dumps(r.best), "sft")
        assert why is None and example["messages"][:-1] == messages


@pytest.mark.slow
def test_unfinished_samples_are_not_candidates(loaded):
    """Six tokens from a random 128k-vocabulary model end without a stop token (the same
    samples as above, same seed): no candidate, nothing kept."""
    _, _, results = _results(loaded, keep_unfinished=False)
    assert all(r.best is None and np.isnan(r.scores).all() and len(r.texts) == N
               for r in results)


@pytest.mark.parametrize("args, message", [
    (["--n=0"], "--n (0) and --max_new_tokens (6) must be >= 1"),
    (["--reward=POLICY"], "is not a reward model export"),
])
def test_bad_input_is_one_line(setup, capsys, args, message):
    base = {"--policy": str(setup / "policy"), "--reward": str(setup / "rm"),
            "--prompts": str(setup / "prompts.jsonl"), "--n": str(N),
            "--max_new_tokens": str(NEW), "--output": str(setup / "bad.jsonl")}
    for arg in args:
        key, value = arg.split("=")
        base[key] = base["--policy"] if value == "POLICY" else value
    with pytest.raises(SystemExit) as e:
        rejection_sample.main([f"{k}={v}" for k, v in base.items()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err
    assert not os.path.exists(setup / "bad.jsonl")
