"""ModelConfig: published sizes, config file dialects, and the errors of impossible configs."""

import pytest
import torch
import transformers

import llama_jax as lj
from llama_jax import config as config_lib

# Published totals (Hugging Face model cards / safetensors index metadata of each release).
PUBLISHED_PARAMS = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.3-70b": 70_553_706_496,
}

# intermediate_size in the released HF config.json files.
PUBLISHED_FFN = {"llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672,
                 "llama3-8b": 14336, "llama3.1-405b": 53248, "llama3.2-1b": 8192,
                 "llama3.2-3b": 8192}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_abstract_param_count_matches_published(name):
    model = lj.abstract(lj.get_config(name))  # eval_shape: nothing allocated
    assert lj.param_count(model) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_FFN))
def test_meta_ffn_width(name):
    assert lj.get_config(name).ffn_dim == PUBLISHED_FFN[name]


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_hf_config_agrees_with_transformers(name):
    """Our config.json builds a transformers model (on the meta device: no memory) with the
    same parameter count, and reads back to the same architecture."""
    c = lj.get_config(name)
    hf_dict = config_lib.to_hf_config(c)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_dict))
    assert m.num_parameters() == PUBLISHED_PARAMS[name]
    assert config_lib.from_hf_config(hf_dict).arch() == c.arch()
    # transformers' own serialisation uses the newer rope_parameters dialect.
    assert config_lib.from_hf_config(m.config.to_dict()).arch() == c.arch()


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_meta_params_roundtrip(name):
    c = lj.get_config(name)
    back = config_lib.from_meta_params(config_lib.to_meta_params(c),
                                       tie_embeddings=c.tie_embeddings)
    assert back.arch() == c.arch()


def test_legacy_rope_scaling_dialect():
    legacy = dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                  rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192))
    c = config_lib.from_hf_config(legacy)
    assert c.arch() == lj.get_config("llama3.2-1b").replace(norm_eps=1e-6).arch()


def test_meta_params_use_scaled_rope():
    p = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
             ffn_dim_multiplier=1.3, multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0,
             use_scaled_rope=True)
    assert config_lib.from_meta_params(p).arch() == lj.get_config("llama3.1-8b").arch()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=4, n_kv_heads=3), "n_heads 4 is not divisible by n_kv_heads 3"),
    (dict(dim=66, n_heads=4, n_kv_heads=2), "dim 66 is not divisible by n_heads 4"),
    (dict(remat="sometimes"), "Unknown remat policy 'sometimes'"),
])
def test_impossible_configs_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lj.get_config("tiny", **kwargs)


def test_unknown_rope_type():
    hf = config_lib.to_hf_config(lj.get_config("tiny"))
    hf["rope_scaling"] = dict(rope_type="yarn", factor=4.0)
    with pytest.raises(ValueError, match="Unknown rope type 'yarn'.*valid: default, llama3"):
        config_lib.from_hf_config(hf)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model preset 'llama5-1t'.*llama3.1-405b"):
        lj.get_config("llama5-1t")
