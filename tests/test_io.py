"""`llama_jax.io`: which format a directory holds, and where its tokenizer is. Directories are
laid out with empty files: detection reads names and config.json only (loading each format
is tested in test_convert.py and test_meta.py)."""

import json
import os

import pytest

from llama_jax import io


def _layout(root, files):
    """Creates `files` (relative paths; a trailing / makes a directory) under root."""
    for name in files:
        path = os.path.join(root, name)
        os.makedirs(path if name.endswith("/") else os.path.dirname(path), exist_ok=True)
        if not name.endswith("/"):
            open(path, "w").close()
    return str(root)


@pytest.mark.parametrize("files, fmt", [
    (["config.json", "model.safetensors"], "hf"),
    (["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"], "hf"),
    (["params.json", "consolidated.00.pth", "tokenizer.model"], "meta"),
    (["params.json", "consolidated.00.pth", "consolidated.01.pth"], "meta"),
])
def test_formats_are_told_apart_by_their_files(tmp_path, files, fmt):
    assert io.detect_format(_layout(tmp_path, files)) == fmt


def test_params_export_wins_over_hf(tmp_path):
    """An export has a config.json too (and may carry HF tokenizer files): the format field
    decides, and a config.json without it is not an export."""
    d = _layout(tmp_path, ["params/", "model.safetensors"])
    json.dump({"format": "llama_jax", "model": {}}, open(os.path.join(d, "config.json"), "w"))
    assert io.detect_format(d) == "orbax"
    json.dump({"model_type": "llama"}, open(os.path.join(d, "config.json"), "w"))
    assert io.detect_format(d) == "hf"


def test_unreadable_directories_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.detect_format(str(tmp_path / "nowhere"))
    d = _layout(tmp_path / "hf_without_weights", ["config.json", "tokenizer.json"])
    with pytest.raises(ValueError, match="expected config.json with model.safetensors"):
        io.detect_format(d)
    d = _layout(tmp_path / "meta_without_shards", ["params.json"])
    with pytest.raises(ValueError, match="params.json with consolidated.NN.pth"):
        io.detect_format(d)


def test_a_release_root_names_the_checkpoints_inside(tmp_path):
    """Meta's Llama 2 download: one directory per size and the tokenizer beside them."""
    root = _layout(tmp_path / "llama-2", [
        "tokenizer.model", "tokenizer_checklist.chk",
        "llama-2-7b/params.json", "llama-2-7b/consolidated.00.pth",
        "llama-2-13b/params.json", "llama-2-13b/consolidated.00.pth",
        "llama-2-13b/consolidated.01.pth"])
    with pytest.raises(ValueError, match=r"subdirectories \(llama-2-13b, llama-2-7b\); pass one"):
        io.detect_format(root)
    assert io.detect_format(os.path.join(root, "llama-2-7b")) == "meta"


def test_tokenizer_beside_the_weights_or_above_a_meta_directory(tmp_path):
    root = _layout(tmp_path / "release", [
        "tokenizer.model", "llama-2-7b/params.json", "llama-2-7b/consolidated.00.pth",
        "hf/config.json", "hf/model.safetensors"])
    meta_dir, hf_dir = os.path.join(root, "llama-2-7b"), os.path.join(root, "hf")
    assert io.tokenizer_file(meta_dir) == os.path.join(root, "tokenizer.model")
    assert io.tokenizer_file(hf_dir) is None  # only Meta's layout keeps it one level up
    _layout(hf_dir, ["tokenizer.model"])
    assert io.tokenizer_file(hf_dir) == os.path.join(hf_dir, "tokenizer.model")
    _layout(meta_dir, ["tokenizer.model"])
    assert io.tokenizer_file(meta_dir) == os.path.join(meta_dir, "tokenizer.model")
    os.remove(os.path.join(root, "tokenizer.model"))
    os.remove(os.path.join(meta_dir, "tokenizer.model"))
    assert io.tokenizer_file(meta_dir) is None
