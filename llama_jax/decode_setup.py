"""Getting a model and its inputs ready to decode: dtype, mesh placement, padding and checks.

Sharding uses the one logical -> mesh table of `sharding.py` without FSDP: weights split over
`tensor` (heads, mlp, vocab), replicated over `data`; the batch and the cache go over `data`
and the cache's kv heads over `tensor`. A logical axis the mesh axis does not divide is
replicated (e.g. K = 2 kv heads on tensor = 4: every device keeps both, as in Llama 3 70B
serving).

Axis letters: B batch, P prompt bucket, S cache slots, K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model as model_lib
from llama_jax import sharding
from llama_jax.config import ModelConfig

MAX_STOP_IDS = 8  # stop ids are padded to this many (with -1) so their count does not recompile


def with_dtype(model: model_lib.Llama, dtype: str) -> model_lib.Llama:
    """A copy of the model with parameters and compute in `dtype` ("float32", "bfloat16")."""
    config = model.config.replace(dtype=dtype, param_dtype=dtype)
    graphdef, _ = nnx.split(model_lib.abstract(config, model.backend, model.parallel))
    state = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Meshes.


def make_mesh(data: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """A (data, tensor) mesh over the first data × tensor devices."""
    if data * tensor > jax.device_count():
        raise ValueError(f"A {data}×{tensor} mesh needs {data * tensor} devices but only "
                         f"{jax.device_count()} exist; choose data × tensor <= the device count.")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, tensor), ("data", "tensor"), axis_types=(auto, auto),
                         devices=jax.devices()[:data * tensor])


def _spec(axes, shape, mesh) -> PartitionSpec:
    """sharding.RULES without FSDP: weights split over `tensor`, replicated over `data`."""
    return sharding.spec(axes, shape, mesh, fsdp=False)


def shard(model: model_lib.Llama, mesh) -> model_lib.Llama:
    """The model with each parameter placed on `mesh` by its logical `axes` metadata."""
    graphdef, state = nnx.split(model)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, _spec(v.axes, v.shape, mesh)), state, is_leaf=is_var)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def cache_shardings(mesh, config) -> dict[str, NamedSharding]:
    """k, v [L, B_data, S, K_tensor, H]; pos, seg [B_data, S]."""
    heads = _spec(("kv_heads",), (config.n_kv_heads,), mesh)[0]  # None if tensor ∤ K
    kv = PartitionSpec(None, "data", None, heads, None)
    rows = PartitionSpec("data", None)
    return dict(k=NamedSharding(mesh, kv), v=NamedSharding(mesh, kv),
                pos=NamedSharding(mesh, rows), seg=NamedSharding(mesh, rows))


# ----------------------------------------------------------------------------------------------
# Inputs.


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): lengths that share a bucket share a compile."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_batch(prompts, p: int, multiple: int):
    """Prompts right-padded to tokens [B, P] with lengths [B]; B rounded up to `multiple`
    (the data axis) with one-token filler rows."""
    b = -(-len(prompts) // multiple) * multiple
    tokens, lengths = np.zeros((b, p), np.int32), np.ones((b,), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, :len(x)], lengths[i] = x, len(x)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def stop_array(stop_ids) -> np.ndarray:
    """stop ids [MAX_STOP_IDS] int32, padded with -1 (never a token)."""
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return stops


def check_inputs(config, prompts, max_new_tokens, sampling, stop_ids, max_len) -> None:
    """Raises ValueError, one sentence each, before anything is compiled."""
    if not prompts:
        raise ValueError("No prompts given; pass at least one list of token ids.")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token "
                             "(e.g. the BOS id).")
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"Prompt {i} has token id {bad[0]} outside the model's vocabulary "
                             f"[0, {config.vocab_size}); check the tokenizer matches the model.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"A prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit the "
            f"cache of {max_len} slots; shorten the prompt, lower max_new_tokens or raise max_len.")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"At most {MAX_STOP_IDS} stop ids are supported, got {len(stop_ids)}.")
    sampling.validate(config.vocab_size)


def check_vocab(tokenizer_vocab_size: int, config: ModelConfig) -> None:
    """A tokenizer must have exactly the model's vocabulary (else ids mean other tokens)."""
    if tokenizer_vocab_size != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer_vocab_size} tokens but the checkpoint's vocabulary "
            f"has {config.vocab_size}; use the tokenizer the checkpoint was trained with.")
