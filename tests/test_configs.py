"""Every experiment config loads, is locked, declares exactly the library's keys, and builds its
model with eval_shape."""

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import data, experiment, flops, lora, optim, posttrain, sharding, train
from llama_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))
                 if os.path.basename(p) != "__init__.py")
# Each section and the dataclass it is built from; optim's total_steps is train.steps.
SECTIONS = {"model": (ModelConfig, ()), "data": (data.DataConfig, ()),
            "optim": (optim.OptimConfig, ("total_steps",)), "mesh": (sharding.MeshConfig, ()),
            "dpo": (posttrain.DPOConfig, ()), "lora": (lora.LoraConfig, ())}


def load(path, arg=""):
    config = experiment.load(f"{path}:{arg}" if arg else path)
    # The launch line (experiments/train.py, or tools/plan.py for the plan_* layouts).
    module_doc = open(path).read().split('"""')[1]
    assert f"--config=experiments/configs/{os.path.basename(path)}" in module_doc
    return config


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
    assert sum(int(np.prod(x.shape)) for x in leaves) == flops.param_count(model_config)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_sections_declare_exactly_the_dataclass_fields(path):
    config = load(path)
    assert set(config) == set(SECTIONS) | {"train"}
    for name, (cls, run_fields) in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - set(run_fields)
        assert set(config[name]) == fields, name
    # and the run turns them back into the dataclasses without renaming anything
    assert train.data_config(config.data) == data.DataConfig(**config.data.to_dict())
    ocfg = train.optim_config(config)
    assert ocfg.total_steps == config.train.steps and ocfg.peak_lr == config.optim.peak_lr
    assert sharding.from_config(config.mesh).sizes() == (
        config.mesh.data, config.mesh.pipeline, config.mesh.context, config.mesh.tensor)


def test_base_takes_the_library_defaults():
    """A default changed in a dataclass is the experiments' default: nothing restates it."""
    c = experiment.base("tiny")
    for name, (cls, run_fields) in SECTIONS.items():
        if cls is ModelConfig:
            continue
        want = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in run_fields}
        assert c[name].to_dict() == want, name


def test_section_refuses_unknown_fields():
    with pytest.raises(KeyError, match="no field"):
        experiment.section(optim.OptimConfig, microbatches=2)


def test_plan_layouts_set_no_dead_keys():
    """The plan_* configs change their recipe only where the layout differs."""
    for name, recipe in [("plan_llama1_65b.py", "llama1_65b.py"),
                         ("plan_llama3_405b_paper.py", "llama3_405b.py")]:
        plan_c = load(os.path.join(ROOT, "experiments", "configs", name))
        base_c = load(os.path.join(ROOT, "experiments", "configs", recipe))
        assert plan_c.optim.to_dict() == base_c.optim.to_dict()
        assert plan_c.mesh.attention == base_c.mesh.attention and plan_c.mesh != base_c.mesh


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


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        experiment.load(str(tmp_path / "nope.py:test"))
