"""llama-jax: the LLaMA family in JAX and Flax NNX.

Public API:
    model = llama_jax.load(path)          # Hugging Face checkpoint directory
    logits = model(tokens)                # [B, T] int -> [B, T, V] float32
    config = llama_jax.get_config("llama3.1-8b")
    model = llama_jax.create(config)      # random init; llama_jax.abstract(config): no memory
    model = llama_jax.with_backend(model, llama_jax.backends.get("auto"))  # CPU fast paths
"""

from llama_jax import hardware
from llama_jax.config import PRESETS, ModelConfig, RopeScaling, get_config
from llama_jax import backends
from llama_jax.model import Llama, abstract, create, init_cache, param_count, with_backend
from llama_jax.io import load

# libtpu (the `plan` extra) would announce on every start of a host without a TPU that it found
# none; JAX is kept to the CPU there before anything starts a backend.
hardware.skip_absent_tpu()

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "get_config", "Llama", "abstract", "create",
           "init_cache", "param_count", "load", "backends", "with_backend"]
