"""`llama_jax.load(path)`: one call for every checkpoint directory the project reads."""

from __future__ import annotations

import os

from llama_jax import hf


def detect_format(path: str) -> str:
    """'hf' for config.json + safetensors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
    files = set(os.listdir(path))
    if "config.json" in files and ("model.safetensors" in files
                                   or "model.safetensors.index.json" in files):
        return "hf"
    raise ValueError(
        f"{path} is not a checkpoint directory llama_jax can read: expected config.json with "
        "model.safetensors or model.safetensors.index.json (Hugging Face).")


def load(path: str, **overrides):
    """Loads a checkpoint directory as a `Llama` model; `overrides` replace ModelConfig fields
    (dtype="bfloat16", scan_layers=False, ...)."""
    fmt = detect_format(path)
    if fmt == "hf":
        return hf.load_hf(path, **overrides)
    raise AssertionError(fmt)
