"""Llama 3's staged context extension (experiments/configs/llama3_context.py): each stage starts
from the previous one's export with longer rows, its own RoPE scaling and context parallelism
once rows outgrow a device; train.init_from accepts the changed RoPE and keeps the weights."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import llama_jax
from llama_jax import experiment, hf, sharding, train
from llama_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "experiments", "configs", "llama3_context.py")


@pytest.mark.parametrize("size,stages", [("8b", range(1, 5)), ("tiny", range(0, 3))])
def test_each_stage_continues_the_previous_one(size, stages):
    configs = [experiment.load(f"{PATH}:{size},{k},/runs") for k in stages]
    for k, c in zip(stages, configs):
        m = ModelConfig.from_dict(c.model.to_dict())
        assert c.data.seq_len == m.max_seq_len
        assert c.train.init_from == (f"/runs/stage{k - 1}/export" if k else "")
        assert m.rope_theta == 500000.0
        # Tokens per step stay the same; each device holds at most the per-device row budget.
        assert c.data.global_batch * c.data.seq_len == configs[0].data.global_batch * \
            configs[0].data.seq_len
        assert c.data.seq_len // c.mesh.context <= {"8b": 16384, "tiny": 128}[size]
    lengths = [c.data.seq_len for c in configs]
    assert lengths == [lengths[0] * 2 ** i for i in range(len(lengths))]
    last = ModelConfig.from_dict(configs[-1].model.to_dict())
    if size == "8b":  # the released 128K models' RoPE at the last stage (Llama 3.1 config)
        assert lengths[-1] == 131072 and last.rope_scaling == llama_jax.get_config(
            "llama3.1-8b").rope_scaling
    with pytest.raises(ValueError, match="SIZE,STAGE,ROOT"):
        experiment.load(f"{PATH}:8b")
    with pytest.raises(ValueError, match="not in this chain"):
        experiment.load(f"{PATH}:8b,0,/runs")


def test_init_from_takes_the_weights_under_new_rope(tmp_path):
    stage1 = ModelConfig.from_dict(experiment.load(f"{PATH}:tiny,1,/r").model.to_dict())
    stage2 = ModelConfig.from_dict(experiment.load(f"{PATH}:tiny,2,/r").model.to_dict())
    assert stage1.rope_scaling != stage2.rope_scaling
    source = llama_jax.create(stage1, seed=3)
    hf.save_hf(source, str(tmp_path / "stage1"))
    mc = sharding.MeshConfig()
    mesh = sharding.make_mesh(mc)
    _, abstract_params = nnx.split(train.abstract(stage2), nnx.Param)
    state = train.init_from(str(tmp_path / "stage1"), stage2, optax.adamw(1e-3), mesh, mc,
                            abstract_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state.params, nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    with pytest.raises(ValueError, match="dim 64 != 32"):  # shapes still must match
        train.init_from(str(tmp_path / "stage1"), stage2.replace(dim=32, ffn_dim=96),
                        optax.adamw(1e-3), mesh, mc, nnx.split(train.abstract(stage2.replace(
                            dim=32, ffn_dim=96)), nnx.Param)[1])
