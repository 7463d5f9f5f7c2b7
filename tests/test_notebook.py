"""llama_jax.notebook and notebook_mesh: the helpers the notebooks call (the notebooks
themselves run in test_notebooks.py)."""

import io
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import llama_jax
from llama_jax import flops, hardware, notebook, notebook_mesh, sharding, tokenizer
from llama_jax import experiment


def test_small_checkpoint_is_built_once_and_loads(tmp_path):
    path = notebook.checkpoint_or_small("", str(tmp_path))
    stamp = os.path.getmtime(os.path.join(path, "config.json"))
    assert notebook.checkpoint_or_small("", str(tmp_path)) == path
    assert os.path.getmtime(os.path.join(path, "config.json")) == stamp  # not rebuilt
    model = llama_jax.load(path)
    assert model.config.arch() == notebook.SMALL.arch()
    assert notebook.checkpoint_config(path).arch() == notebook.SMALL.arch()
    assert isinstance(notebook.load_tokenizer(path), tokenizer.ByteTokenizer)


def test_missing_checkpoint_says_how_to_build_the_small_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; set CHECKPOINT = '' to build"):
        notebook.checkpoint_or_small(str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        notebook.checkpoint_or_small(str(tmp_path), str(tmp_path))  # exists, holds nothing


def test_check_fits_names_the_setting_to_lower():
    cfg = llama_jax.get_config("llama3-8b")
    n = flops.param_count(cfg)
    assert notebook.bytes_needed(cfg, "load", "bfloat16") == 2 * n
    with pytest.raises(MemoryError, match=r"llama3-8b needs about 29\.9 GiB .* set DTYPE = "
                                          r"'bfloat16' \(half the bytes\) or a smaller CHECKPOINT"):
        notebook.check_fits(cfg, "load", "float32", available=20 * 2**30)
    assert notebook.check_fits(cfg, "load", "bfloat16", available=20 * 2**30) == 2 * n
    with pytest.raises(MemoryError, match="lower config.data.global_batch or config.data.seq_len"):
        notebook.check_fits(cfg, "train", rows=256, seq_len=8192, available=2**40)
    # LoRA keeps the frozen f32 base (4 bytes a parameter) where full training keeps 16
    per_row = (notebook.bytes_needed(cfg, "lora", rows=2, seq_len=64)
               - notebook.bytes_needed(cfg, "lora", rows=1, seq_len=64))
    d = jax.device_count()
    assert notebook.bytes_needed(cfg, "lora", seq_len=64) == pytest.approx(4 * n / d + per_row)
    assert notebook.bytes_needed(cfg, "train", seq_len=64) == pytest.approx(16 * n / d + per_row)
    with pytest.raises(ValueError, match="purpose"):
        notebook.check_fits(cfg, "serve")
    have, what = notebook.device_memory()  # this runtime: host RAM on a CPU
    assert have > 2**28 and what


def test_metrics_are_read_and_plotted(tmp_path):
    rows = [dict(step=s, loss=5.0 - s / 10, lr=1e-3 * s, tokens=512) for s in range(1, 6)]
    rows.insert(3, dict(step=3, eval_loss=4.9))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = notebook.read_metrics(str(tmp_path))
    np.testing.assert_array_equal(m["loss"][0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(m["loss"][1], [4.9, 4.8, 4.7, 4.6, 4.5])
    np.testing.assert_array_equal(m["eval_loss"][0], [3])
    fig = notebook.plot_metrics(str(tmp_path))
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), m["loss"][1])
    np.testing.assert_allclose(left.lines[1].get_ydata(), [4.9])
    np.testing.assert_allclose(right.lines[0].get_ydata(), m["lr"][1])


def test_text_stream_holds_back_partial_characters():
    tok, out = tokenizer.ByteTokenizer(), io.StringIO()
    stream = notebook.TextStream(tok, tok.stop_ids, out=out)
    ids = tok.encode("aé", bos=False, eos=False)  # 'a', then é as two bytes
    for step, t in enumerate(ids, 1):
        stream(step, np.array([t, 0]), np.array([step, 0]))
        if step == 2:
            assert out.getvalue() == "a"  # half of é is not shown
    stream(4, np.array([tok.eos_id, 0]), np.array([4, 0]))  # the stop token is not text
    stream(5, np.array([99, 0]), np.array([4, 0]))  # row 0 stopped: nothing emitted
    assert out.getvalue() == "aé" and stream.ids == ids


def test_blocks_of_a_weight_and_an_activation():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, tensor=2))
    held = notebook_mesh.blocks(NamedSharding(mesh, P(None, "data", "tensor")), (2, 64, 192),
                                dims=(1, 2))
    assert len(held) == 8 and sorted(i for ids in held.values() for i in ids) == list(range(8))
    assert held[((16, 32), (96, 192))] == [mesh.devices[1, 0, 0, 1].id]
    held = notebook_mesh.blocks(NamedSharding(mesh, P("data", None, None)), (8, 4, 64),
                                dims=(0, 2))
    assert list(held) == [((2 * i, 2 * i + 2), (0, 64)) for i in range(4)]
    assert all(len(ids) == 2 for ids in held.values())  # replicated over tensor


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 simulated devices of conftest")
def test_tpu_memory_estimate_on_cpu():
    config = experiment.base("tiny")
    config.data.seq_len, config.data.global_batch = 64, 8
    # XLA's optimisation passes are not what this checks (parameter bytes follow from the rules)
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        report = notebook_mesh.tpu_memory(config, "v5e:2x4", compiler="cpu")
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    mem = report["memory"]
    # Parameters: every matrix splits its D over data 8 (FSDP), the norm gains are replicated.
    cfg = llama_jax.get_config("tiny")
    params = nnx.state(llama_jax.abstract(cfg), nnx.Param)
    norms = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(params)) if "scale" in str(path[-1]))
    assert mem["params"] == 4 * ((flops.param_count(cfg) - norms) // 8 + norms)
    assert 0 <= mem["optimizer"] - 2 * mem["params"] <= 64  # AdamW's two moments, a count
    assert mem["capacity"] == hardware.DEVICES["v5e"].hbm_bytes and report["fits"]
    assert report["target"] == "v5e:2x4" and "XLA:CPU" in report["source"]
    assert "fits" in notebook_mesh.memory_table(report)
    with pytest.raises(ValueError, match="not one slice"):
        notebook_mesh.tpu_memory(config, "2xv5e:4x4")


def test_conversion_progress_counts_every_byte_read(monkeypatch):
    from tqdm import tqdm

    from llama_jax import progress
    out = io.StringIO()
    monkeypatch.setattr(progress, "bar", lambda total, desc, unit="B": tqdm(
        total=total, desc=desc, file=out, disable=False, mininterval=0))

    class Source:
        names = ["a", "b"]
        arrays = {"a": np.ones((4, 8), np.float32), "b": np.ones((3,), np.int8)}
        config = "the config"

        def shape(self, n):
            return self.arrays[n].shape

        def dtype(self, n):
            return self.arrays[n].dtype

        def get(self, n):
            return self.arrays[n]

    reading = progress.Reading(Source(), "a -> b")
    assert reading.config == "the config" and reading.names == ["a", "b"]
    assert reading._bar.total == 4 * 8 * 4 + 3
    assert reading.get("a") is Source.arrays["a"] and reading._bar.n == 128
    reading.get("b")
    reading.close()
    assert "100%" in out.getvalue() and "a -> b" in out.getvalue()


def test_steps_bar_only_for_several_items():
    from llama_jax import progress
    one = [["--config.mesh.tensor=2"]]
    assert progress.steps(one, "compiling") is one
    assert list(progress.steps([1, 2, 3], "compiling")) == [1, 2, 3]
