"""tools/average_checkpoints.py: the elementwise (weighted) mean, in any output format, and its
one-line refusals."""

import os

import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import hf, reward, safetensors_io
from tools import average_checkpoints

CONFIG = llama_jax.get_config("tiny", n_layers=2, vocab_size=96, dim=32, n_heads=2,
                              n_kv_heads=1, ffn_dim=64)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two Hugging Face checkpoints of one architecture (different seeds)."""
    tmp = tmp_path_factory.mktemp("avg")
    for seed, name in ((1, "a"), (2, "b")):
        hf.save_hf(llama_jax.create(CONFIG, seed=seed), str(tmp / name))
    return tmp


def _tensors(directory):
    st = safetensors_io.ShardedSafetensors(str(directory))
    return {k: np.asarray(st.get(k), np.float64) for k in st.keys()}


def test_mean_of_two_hf_checkpoints(two, tmp_path):
    average_checkpoints.main([f"--input={two / 'a'}", f"--input={two / 'b'}",
                              f"--output={tmp_path / 'mean'}"])
    a, b, mean = _tensors(two / "a"), _tensors(two / "b"), _tensors(tmp_path / "mean")
    assert mean.keys() == a.keys() and len(mean) == len(hf.tensor_names(CONFIG))
    for k in a:
        np.testing.assert_allclose(mean[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
    assert llama_jax.load(str(tmp_path / "mean")).config.arch() == CONFIG.arch()


def test_weighted_mean_to_orbax(two, tmp_path):
    average_checkpoints.main([f"--input={two / 'a'}", f"--input={two / 'b'}", "--weights=3,1",
                              f"--output={tmp_path / 'avg'}", "--to=orbax"])
    params = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
    a, b = (params(llama_jax.load(str(two / n))) for n in "ab")
    got = params(llama_jax.load(str(tmp_path / "avg")))
    for (k, x), (_, y), (_, z) in zip(_leaves(got), _leaves(a), _leaves(b)):
        np.testing.assert_allclose(np.asarray(x), 0.75 * np.asarray(y, np.float64)
                                   + 0.25 * np.asarray(z, np.float64), rtol=0, atol=1e-7,
                                   err_msg=k)


def _leaves(tree, prefix=""):
    for k in sorted(tree):
        v = tree[k]
        yield from (_leaves(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + k, v)])


@pytest.mark.parametrize("args, message", [
    (["--weights=1,2,3"], "--weights='1,2,3' needs 2 non-negative numbers"),
    (["--to=safetensors"], "invalid choice"),
])
def test_bad_options_are_one_line(two, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        average_checkpoints.main([f"--input={two / 'a'}", f"--input={two / 'b'}",
                                  f"--output={tmp_path / 'out'}", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out")


def test_another_architecture_names_the_field(two, tmp_path, capsys):
    hf.save_hf(llama_jax.create(CONFIG.replace(ffn_dim=96)), str(tmp_path / "wide"))
    with pytest.raises(SystemExit) as e:
        average_checkpoints.main([f"--input={two / 'a'}", f"--input={tmp_path / 'wide'}",
                                  f"--output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds another architecture" in err and "ffn_dim 96 != 64" in err
    assert not os.path.exists(tmp_path / "out")


def test_reward_models_average_into_a_reward_export(two, tmp_path, capsys):
    for seed, name in ((1, "ra"), (2, "rb")):
        reward.save(str(tmp_path / name), reward.create(CONFIG, seed=seed))
    average_checkpoints.main([f"--input={tmp_path / 'ra'}", f"--input={tmp_path / 'rb'}",
                              "--weights=1,3", f"--output={tmp_path / 'mean'}"])
    a, b, got = (reward.params_of(reward.load(str(tmp_path / n))) for n in ("ra", "rb", "mean"))
    for (k, x), (_, y), (_, z) in zip(_leaves(got), _leaves(a), _leaves(b)):
        np.testing.assert_allclose(np.asarray(x), 0.25 * np.asarray(y, np.float64)
                                   + 0.75 * np.asarray(z, np.float64), rtol=0, atol=1e-7,
                                   err_msg=k)
    with pytest.raises(SystemExit):  # a reward model with a language model
        average_checkpoints.main([f"--input={tmp_path / 'ra'}", f"--input={two / 'a'}",
                                  f"--output={tmp_path / 'mixed'}"])
    assert "not both reward models" in capsys.readouterr().err
