"""LoRA: the adapted product, SFT training only the adapters, and the exports that
transformers and peft load (merged weights; the adapter alone in PEFT's layout)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax import hf, lora, train, train_checkpoint

import chat_setup
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture: no XLA optimisation passes

RANK, ALPHA = 4, 8.0


def _tokens(vocab, shape=(2, 24)):
    return np.random.RandomState(0).randint(0, vocab, shape)


def test_adapters_start_as_the_base_and_merge_exactly():
    """B = 0 leaves the model unchanged; with B random, merge (W + s·A·B) equals the two-path
    product and base() is the model before the adapters."""
    c = chat_setup.CONFIG.replace(scan_layers=True)
    m = hf.from_params(c, train.init_params(c, 1))
    tokens = jnp.asarray(_tokens(m.config.vocab_size))
    logits = nnx.jit(lambda model, x: model(x))
    before = np.asarray(logits(m, tokens))
    lora.attach(m, lora.LoraConfig(rank=RANK, alpha=ALPHA))
    np.testing.assert_array_equal(np.asarray(logits(m, tokens)), before)
    for i, adapter in enumerate(lora.adapters_of(m).values()):
        adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), adapter.b.shape)
    adapted = np.asarray(logits(m, tokens))
    assert np.abs(adapted - before).max() > 0.1
    np.testing.assert_allclose(np.asarray(logits(lora.merge(m), tokens)), adapted, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(logits(lora.base(m), tokens)), before)
    assert not lora.adapters_of(lora.merge(m)) and not lora.adapters_of(lora.base(m))


def test_bad_lora_settings_are_one_sentence():
    with pytest.raises(ValueError, match="lora.targets 'wq,q_proj' names \\['q_proj'\\]"):
        lora.check(lora.LoraConfig(rank=4, targets="wq,q_proj"))
    with pytest.raises(ValueError, match="lora.rank -1 must be >= 0"):
        lora.check(lora.LoraConfig(rank=-1))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save_peft("unused", llama_jax.abstract(chat_setup.CONFIG))


# ----------------------------------------------------------------------------------------------
# SFT with train.run from a Hugging Face base: full vs LoRA.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, LoRA run's final TrainState): a 3-step LoRA SFT run and a 1-step full one, both
    from the same Hugging Face base and data."""
    tmp = tmp_path_factory.mktemp("lora")
    common = {"train.init_from": chat_setup.base_checkpoint(str(tmp / "base")),
              "data.files": chat_setup.sft_file(tmp / "sft.jsonl"), "optim.peak_lr": 1e-2}
    train.run(chat_setup.config("sft", tmp, **common, **{"train.steps": 1}), str(tmp / "full"))
    state = train.run(chat_setup.config("sft", tmp, **common, **{
        "train.steps": 3, "lora.rank": RANK, "lora.alpha": ALPHA}), str(tmp / "lora"))
    return tmp, state


@pytest.mark.slow
def test_first_lora_step_has_full_sfts_loss(runs):
    tmp, _ = runs
    full, adapted = chat_setup.metrics(tmp / "full"), chat_setup.metrics(tmp / "lora")
    assert adapted[0]["loss"] == full[0]["loss"]  # B = 0: the same model on the same batch
    assert adapted[-1]["loss"] < adapted[0]["loss"]  # and the adapters learn


@pytest.mark.slow
def test_only_adapters_are_trained_and_checkpointed(runs):
    tmp, state = runs
    names = lambda tree: {train_checkpoint.tree_path(p)  # noqa: E731
                          for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
    params, opt = names(state.params), names(state.opt_state)
    assert params and all("_lora/" in p for p in params)
    assert len(params) == 2 * len(lora.TARGETS)  # A and B of every default target
    assert all("_lora/" in p for p in opt if "/mu/" in p or "/nu/" in p)
    ckpt = train_checkpoint.Manager(str(tmp / "lora"), chat_setup.CONFIG, save_every=0, keep=1)
    saved = ckpt.saved_shapes(3)
    ckpt.close()
    weights = [p for p in saved if p.startswith(("params/", "opt_state/"))]
    assert weights and all("_lora/" in p or p.endswith("/count") for p in weights)


@pytest.mark.slow
def test_exports_give_the_projects_logits_in_transformers(runs):
    """The project's adapted model (base + trained adapters, two-path product), its merged
    export converted to HF, and peft's merge of the PEFT export: the same logits."""
    tmp, state = runs
    base = llama_jax.load(str(tmp / "base"))
    ours = lora.attach(llama_jax.load(str(tmp / "base")),
                       lora.LoraConfig(rank=RANK, alpha=ALPHA))
    nnx.update(ours, jax.device_get(state.params))
    tokens = _tokens(base.config.vocab_size)
    want = np.asarray(ours(jnp.asarray(tokens)))
    assert np.abs(want - np.asarray(base(jnp.asarray(tokens)))).max() > 1e-2  # it trained

    hf.save_hf(llama_jax.load(str(tmp / "lora" / "export")), str(tmp / "merged_hf"))
    merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "merged_hf")).eval()
    hf_base = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "base")).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(tmp / "lora" / "adapter")).eval()
    with open(tmp / "lora" / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == str(tmp / "base")
    with torch.no_grad():
        x = torch.tensor(tokens)
        unmerged = peft_model(x).logits.numpy()
        peft_merged = peft_model.merge_and_unload()(x).logits.numpy()
        from_export = merged(x).logits.numpy()
    for got in (unmerged, peft_merged, from_export):
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
