"""train.run with the post-training objectives (sft.py, dpo.py, reward.py at :test size, from a
2-layer export carrying the Llama 3 tokenizer): the first logged loss is the loss before the
first update, DPO starts at log 2 + 0.2·NLL and separates a toy set in a few steps, the reward
model's export scores, and plain mistakes fail before anything is built."""

import json
import os

import jax
import llama_models.llama3.tokenizer as meta_tok
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import chat_data, checkpoint, experiment, reward, train
from llama_jax import tokenizer as tok_lib

from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = os.path.join(os.path.dirname(meta_tok.__file__), "tokenizer.model")
CONFIG = llama_jax.get_config("tiny", vocab_size=128256, dim=32, n_layers=2, n_heads=2,
                              n_kv_heads=1, ffn_dim=64, max_seq_len=128, scan_layers=False,
                              tie_embeddings=True)  # one [V, D] matrix to write and restore


def _jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("posttrain_run")
    model = llama_jax.create(CONFIG, seed=0)
    model.embed[...] = model.embed[...] * 8  # log-probs that differ by token
    base = checkpoint.save_params(str(d / "base"), model, tokenizer_path=LLAMA3)
    sft = _jsonl(d / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"count from {i}"},
                      {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]}
        for i in range(16)])
    # separable: every chosen response says yes, every rejected one no
    pairs = _jsonl(d / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"Is {i} a number?"}],
         "chosen": [{"role": "assistant", "content": "yes indeed"}],
         "rejected": [{"role": "assistant", "content": "no way"}]} for i in range(16)])
    return dict(dir=d, base=base, sft=sft, pairs=pairs)


def _config(name, files, **overrides):
    c = experiment.load(os.path.join(ROOT, "experiments", "configs", f"{name}.py:test"))
    c.unlock()
    c.train.init_from = files["base"]
    c.data.files = files["sft" if name == "sft" else "pairs"]
    c.data.data_dir = str(files["dir"] / "tfds")
    c.mesh.data, c.mesh.tensor = 4, 2  # the 8 simulated devices; batches split over data
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    c.lock()
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def _first_batch(config):
    tok = tok_lib.load_tokenizer(LLAMA3)
    kind = "sft" if config.train.objective == "sft" else "preference"
    ds = chat_data.make_dataset(kind, train.data_config(config.data), tok, prefetch=0)
    return jax.tree.map(np.asarray, next(iter(ds)))


def _base_loss(files, batch):
    """train.loss_fn (tested against transformers in test_posttrain) of the base weights."""
    graphdef, params = nnx.split(llama_jax.load(files["base"]), nnx.Param)
    _, (ce, n) = train.loss_fn(params, graphdef, batch)
    return float(ce / n)


@pytest.mark.slow
def test_sft_run_logs_the_loss_before_the_first_update(files, tmp_path):
    config = _config("sft", files)
    train.run(config, str(tmp_path))
    logged = _metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert logged[0]["loss"] == pytest.approx(_base_loss(files, _first_batch(config)), rel=1e-5)
    assert all(np.isfinite(m["loss"]) and m["tokens"] > 0 for m in logged)
    assert checkpoint.is_params_checkpoint(str(tmp_path / "export"))
    assert checkpoint.tokenizer_path(str(tmp_path / "export"))  # carried from init_from


@pytest.mark.slow
def test_dpo_run_starts_at_log2_plus_nll_and_separates_a_toy_set(files, tmp_path):
    config = _config("dpo", files, **{"train.steps": 6, "train.eval_every": 3,
                                      "train.eval_batches": 1})
    train.run(config, str(tmp_path))
    logged = _metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [json.loads(line) for line in f if "eval_loss" in line]
    # held-out pairs: the DPO loss (with the reference), falling as the pairs separate
    assert [e["step"] for e in evals] == [3, 6] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[0]["eval_loss"] < np.log(2) + 0.2 * logged[0]["nll_loss"]
    first, last = logged[0], logged[-1]
    assert first["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
    # the NLL term: mean -log p over the chosen responses' content tokens, before the update
    batch = _first_batch(config)
    chosen = dict(batch, loss_mask=batch["loss_mask"] * (batch["sequence"] % 2 == 0))
    assert first["nll_loss"] == pytest.approx(_base_loss(files, chosen), rel=1e-5)
    assert first["loss"] == pytest.approx(np.log(2) + 0.2 * first["nll_loss"], rel=1e-6)
    assert abs(first["margin"]) < 1e-5
    margins = [m["margin"] for m in logged]
    assert all(b > a for a, b in zip(margins, margins[1:])) and margins[-1] > 0.05
    assert last["reward_accuracy"] == 1.0 and last["dpo_loss"] < first["dpo_loss"]


@pytest.mark.slow
def test_reward_run_exports_a_model_that_ranks_the_pairs(files, tmp_path):
    config = _config("reward", files, **{"train.steps": 6})
    train.run(config, str(tmp_path))
    logged = _metrics(tmp_path)
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["reward_accuracy"] == 1.0
    model = reward.load(str(tmp_path / "export"))
    tok = tok_lib.load_tokenizer(checkpoint.tokenizer_path(str(tmp_path / "export")))
    pair = {"prompt": [{"role": "user", "content": "Is 99 a number?"}],
            "chosen": [{"role": "assistant", "content": "yes indeed"}],
            "rejected": [{"role": "assistant", "content": "no way"}]}
    chosen, rejected = chat_data.encode_pair(tok, pair)
    scores = reward.score(model, [list(chosen.tokens), list(rejected.tokens)])
    assert scores[0] > scores[1]


def test_hf_checkpoint_gives_the_architecture_and_tokenizer(files, tmp_path):
    from llama_jax import hf, posttrain_run
    small = CONFIG.replace(vocab_size=128256, n_layers=1)
    hf.save_hf(llama_jax.create(small), str(tmp_path / "hf"))
    os.makedirs(tmp_path / "hf" / "original")
    with open(LLAMA3, "rb") as src, open(tmp_path / "hf" / "original" / "tokenizer.model",
                                         "wb") as dst:
        dst.write(src.read())
    config = _config("sft", files, **{"train.init_from": str(tmp_path / "hf"),
                                      "model.remat": "full"})
    got = posttrain_run.model_config(config)
    assert got.arch() == small.arch() and got.remat == "full"  # execution options: the run's
    assert posttrain_run.tokenizer_spec(config) == str(tmp_path / "hf" / "original" /
                                                      "tokenizer.model")


def _must_not_run(*args, **kwargs):
    raise AssertionError("the model was built although a check should have failed")


def test_plain_mistakes_fail_before_anything_is_built(files, tmp_path, monkeypatch):
    from llama_jax import posttrain_run
    monkeypatch.setattr(posttrain_run, "abstract_model", _must_not_run)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"every one of the 1 examples .*bad.jsonl:1: no "
                                         r"assistant turn"):
        train.run(_config("sft", files, **{"data.files": bad}), str(tmp_path / "a"))
    other = checkpoint.save_params(str(tmp_path / "other"), llama_jax.create(
        CONFIG.replace(vocab_size=1000)))
    with pytest.raises(ValueError, match=r"dpo.reference .* differs from the policy .* in "
                                         r"vocab_size 1000 != 128256"):
        train.run(_config("dpo", files, **{"dpo.reference": other}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="starts from a checkpoint"):
        train.run(_config("reward", files, **{"train.init_from": ""}), str(tmp_path / "c"))
    assert not os.listdir(tmp_path / "a") if os.path.exists(tmp_path / "a") else True
