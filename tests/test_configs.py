"""Every experiment config loads, is locked, and builds its model with eval_shape."""

import glob
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import flops
from llama_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the config files import experiments.configs.common
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


def load(path, arg=""):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The launch line (experiments/train.py, or tools/plan.py for the plan_* layouts).
    assert f"--config=experiments/configs/{os.path.basename(path)}" in module.__doc__
    return module.get_config(arg)


def test_all_configs_are_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.py", "llama1_7b.py", "llama1_65b.py", "llama3_8b.py", "llama3_405b.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_locked_and_model_builds_abstractly(path):
    config = load(path)
    with pytest.raises(AttributeError):
        config.train.no_such_field = 1  # locked: a typo in an override fails loudly
    model_config = ModelConfig.from_dict(config.model.to_dict())
    assert config.data.seq_len <= model_config.max_seq_len
    assert config.train.steps > config.optim.warmup_steps
    model = llama_jax.abstract(model_config)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    embeddings = model_config.vocab_size * model_config.dim * (1 + (not model_config.tie_embeddings))
    assert n - embeddings == flops.layer_matmul_params(model_config) + \
        model_config.dim * (2 * model_config.n_layers + 1)  # matmuls + RMSNorm gains


# Published recipes (LLaMA Table 2; Llama 3 Table 3 and §3.4.1): lr, tokens per batch, seq len.
RECIPES = {
    "llama1_7b.py": (3e-4, 4 * 2**20, 2048, 2000), "llama1_13b.py": (3e-4, 4 * 2**20, 2048, 2000),
    "llama1_33b.py": (1.5e-4, 4 * 2**20, 2048, 2000),
    "llama1_65b.py": (1.5e-4, 4 * 2**20, 2048, 2000),
    "llama3_8b.py": (3e-4, 16 * 2**20, 8192, 8000), "llama3_70b.py": (1.5e-4, 16 * 2**20, 8192, 8000),
    "llama3_405b.py": (8e-5, 16 * 2**20, 8192, 8000),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipes(name):
    lr, batch_tokens, seq_len, warmup = RECIPES[name]
    c = load(os.path.join(ROOT, "experiments", "configs", name))
    assert c.optim.peak_lr == lr and c.data.seq_len == seq_len
    assert c.data.global_batch * c.data.seq_len == batch_tokens
    assert c.optim.warmup_steps == warmup
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip_norm) == (0.9, 0.95, 0.1, 1.0)


def test_tiny_test_variant_and_bad_arg():
    tiny = os.path.join(ROOT, "experiments", "configs", "tiny.py")
    base, test = load(tiny), load(tiny, "test")
    assert test.train.steps < base.train.steps and test.model.dim < base.model.dim
    with pytest.raises(ValueError, match="Unknown tiny.py argument"):
        load(tiny, "nope")
