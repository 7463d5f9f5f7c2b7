"""`llama_jax.load(path)`: one call for every checkpoint directory the project reads."""

from __future__ import annotations

import glob
import os

from llama_jax import hf


def detect_format(path: str) -> str:
    """'orbax' for a llama_jax params export, 'hf' for config.json + safetensors, 'meta' for
    params.json + consolidated.NN.pth."""
    from llama_jax import checkpoint

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
    files = set(os.listdir(path))
    if checkpoint.is_params_checkpoint(path):  # before "hf": it has a config.json too
        return "orbax"
    if "config.json" in files and ("model.safetensors" in files
                                   or "model.safetensors.index.json" in files):
        return "hf"
    if "params.json" in files and glob.glob(os.path.join(path, "consolidated.*.pth")):
        return "meta"
    inside = sorted(d for d in files if os.path.isfile(os.path.join(path, d, "params.json")))
    if inside:  # Meta's LLaMA 1/2 release root: one directory per size, the tokenizer beside
        raise ValueError(f"{path} holds Meta checkpoints in subdirectories ({', '.join(inside)}); "
                         f"pass one of them, e.g. {os.path.join(path, inside[0])}.")
    raise ValueError(
        f"{path} is not a checkpoint directory llama_jax can read: expected config.json with "
        "model.safetensors or model.safetensors.index.json (Hugging Face), params.json with "
        "consolidated.NN.pth (Meta), or a llama_jax params export (config.json + params/).")


def tokenizer_file(path: str) -> str | None:
    """The tokenizer.model that belongs to checkpoint directory `path`, or None: beside the
    weights, or for a Meta directory also one level up, where Meta's LLaMA 1/2 releases keep it."""
    if os.path.isfile(os.path.join(path, "params.json")):
        from llama_jax import meta
        return meta.tokenizer_file(path)
    candidate = os.path.join(path, "tokenizer.model")
    return candidate if os.path.isfile(candidate) else None


def load(path: str, **overrides):
    """Loads a checkpoint directory as a `Llama` model; `overrides` replace ModelConfig fields
    (dtype="bfloat16", scan_layers=False, ...)."""
    fmt = detect_format(path)
    if fmt == "hf":
        return hf.load_hf(path, **overrides)
    if fmt == "meta":
        from llama_jax import meta
        return meta.load_meta(path, **overrides)
    if fmt == "orbax":
        from llama_jax import checkpoint
        c = checkpoint.load_config(path).replace(**overrides)
        return checkpoint.load_params(path, config=c, dtype=overrides.get("param_dtype"))
    raise AssertionError(fmt)
