"""One Llama 3 post-training round end to end on CPU (paper §4.1: reward model, rejection
sampling, SFT on the kept samples, DPO, averaging), each stage's output the next one's input,
through the same entry points a user runs: train.run with experiments/configs/{reward, sft,
dpo}.py:test, tools/rejection_sample.py and tools/average_checkpoints.py. DPO runs with LoRA,
so its reference is the base with the adapters off. About 40 s on two loaded CPU cores."""

import json
import math

import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import chat_data, reward, train
from tools import average_checkpoints, rejection_sample

import chat_setup
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes


@pytest.mark.slow
def test_reward_model_rejection_sampling_sft_dpo_average(tmp_path, capsys):
    base = chat_setup.base_checkpoint(str(tmp_path / "base"))
    pairs = chat_setup.pairs_file(tmp_path / "pairs.jsonl")

    train.run(chat_setup.config("reward", tmp_path, **{"train.init_from": base,
                                                      "data.files": pairs}), str(tmp_path / "rm"))
    assert reward.is_reward_checkpoint(str(tmp_path / "rm" / "export"))

    # A 4-step policy rarely emits a stop token in 8 tokens: unfinished samples compete.
    rejection_sample.main([f"--policy={base}", f"--reward={tmp_path / 'rm' / 'export'}",
                           f"--prompts={chat_setup.prompts_file(tmp_path / 'prompts.jsonl')}",
                           "--n=4", "--max_new_tokens=8", "--keep_unfinished",
                           f"--output={tmp_path / 'rs.jsonl'}"])
    assert "Kept 4 of 4 prompts" in capsys.readouterr().out
    lines = (tmp_path / "rs.jsonl").read_text().splitlines()
    assert all(chat_data.parse(line, "sft")[1] is None for line in lines) and len(lines) == 4

    train.run(chat_setup.config("sft", tmp_path, **{
        "train.init_from": base, "data.files": str(tmp_path / "rs.jsonl")}), str(tmp_path / "sft"))
    sft = chat_setup.metrics(tmp_path / "sft")
    assert len(sft) == 4 and sft[-1]["loss"] < sft[0]["loss"]

    train.run(chat_setup.config("dpo", tmp_path, **{
        "train.init_from": str(tmp_path / "sft" / "export"), "data.files": pairs,
        "lora.rank": 4}), str(tmp_path / "dpo"))
    dpo = chat_setup.metrics(tmp_path / "dpo")
    # B = 0 and the reference is the base with the adapters off: policy == reference.
    assert dpo[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo[0]["loss"] == pytest.approx(math.log(2) + 0.2 * dpo[0]["nll_loss"], rel=1e-6)
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").exists()

    average_checkpoints.main([f"--input={tmp_path / 'sft' / 'export'}",
                              f"--input={tmp_path / 'dpo' / 'export'}",
                              f"--output={tmp_path / 'round'}"])
    params = lambda d: nnx.to_pure_dict(nnx.state(  # noqa: E731
        llama_jax.load(str(tmp_path / d)), nnx.Param))
    a, b, mean = params("sft/export"), params("dpo/export"), params("round")
    wq = lambda p: np.asarray(p["layers"]["attn"]["wq"], np.float64)  # noqa: E731
    assert np.abs(wq(a) - wq(b)).max() > 1e-4  # DPO moved the weights
    np.testing.assert_allclose(wq(mean), (wq(a) + wq(b)) / 2, rtol=0, atol=1e-7)
    with open(tmp_path / "round" / "config.json") as f:
        assert json.load(f).get("tokenizer") is None  # a file tokenizer, carried along
    assert (tmp_path / "round" / "tokenizer.model").exists()
