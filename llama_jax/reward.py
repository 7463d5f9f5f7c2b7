"""Reward model: the LLaMA trunk with a scalar head on the last token (Llama 3 paper §4.1.2).

Public interface (stable; tools/rejection_sample.py and the post-training loop use it):

    model = reward.create(config, seed)          # RewardModel; reward.abstract(config): no memory
    r = model.rewards(tokens, positions, segs)   # [B, T] float32: the head on every token
    s = reward.score(model, rows)                # np.float32 [B]: one reward per token row
    reward.save(DIR, model, tokenizer_path=...)  # params-only export, config.json kind "reward"
    model = reward.load(DIR)                     # a RewardModel; reward.is_reward_checkpoint(DIR)
    params = reward.from_lm(lm_params, config)   # a language model's weights + a fresh head

A RewardModel is a Llama whose output projection `lm_head` is replaced by `score` [D]: the
reward of a sequence is score · h_last, h_last the final-norm output of its last token (the
end-of-turn token of the response). The parameter tree is the Llama's without `lm_head`, plus
`score`, so sharding rules, dtypes and layer layouts are those of the language model. Scores
are only meaningful as differences (the Bradley-Terry loss sees r_chosen - r_rejected), so
there is no bias.

The export is checkpoint.py's params-only layout with `"kind": "reward"` in config.json;
`checkpoint.load_params` refuses it (it is not a language model) and points here.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax import checkpoint
from llama_jax.backends import PLAIN, Backend
from llama_jax.config import ModelConfig
from llama_jax.model import Llama, Parallel

KIND = "reward"  # config.json "kind" of a reward export
_INIT = nnx.initializers.normal(stddev=0.02)  # as the model's projections (HF's score layer)


class RewardModel(Llama):
    """`RewardModel(config, rngs=...)`: the Llama trunk, no `lm_head`, a scalar head `score`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backend: Backend = PLAIN,
                 parallel: Parallel = Parallel()):
        super().__init__(config, rngs=rngs, backend=backend, parallel=parallel)
        self.lm_head = None  # a reward model predicts no tokens (an unused init is compiled away)
        self.score = nnx.Param(_INIT(rngs.params(), (config.dim,), jnp.dtype(config.param_dtype)),
                               axes=("embed",))

    def rewards(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """The head on every token's final-norm output: [B, T] float32 for tokens [B, T]."""
        return token_rewards(self.hidden(tokens, positions, segment_ids), self.score[...])

    def unembed(self, x):
        raise TypeError("A RewardModel has no output projection; use rewards() or score().")


def token_rewards(h: jax.Array, score: jax.Array) -> jax.Array:
    """score · h for final-norm outputs h [B, T, D] and the head [D]: [B, T] float32."""
    return jnp.einsum("btd,d->bt", h.astype(jnp.float32), score.astype(jnp.float32))


def create(config: ModelConfig, seed: int = 0, backend: Backend = PLAIN,
           parallel: Parallel = Parallel()) -> RewardModel:
    return RewardModel(config, rngs=nnx.Rngs(seed), backend=backend, parallel=parallel)


def abstract(config: ModelConfig, backend: Backend = PLAIN,
             parallel: Parallel = Parallel()) -> RewardModel:
    """The reward model with ShapeDtypeStructs for parameters: allocates nothing."""
    return nnx.eval_shape(lambda: create(config, 0, backend, parallel))


def from_lm(lm_params: dict, config: ModelConfig, seed: int = 0) -> dict:
    """The pure parameter dict of a RewardModel from a language model's (nnx.to_pure_dict of a
    Llama): its trunk as is, `lm_head` dropped, a fresh `score` head drawn with `seed`."""
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    key = jax.random.fold_in(jax.random.key(seed), 1)
    params["score"] = _INIT(key, (config.dim,), jnp.dtype(config.param_dtype))
    return params


def params_of(model: RewardModel) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def merge(config: ModelConfig, params: dict, backend: Backend = PLAIN,
          parallel: Parallel = Parallel()) -> RewardModel:
    """A RewardModel around a pure parameter dict (not copied)."""
    graphdef, state = nnx.split(abstract(config, backend, parallel), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Scoring token rows.


def score(model: RewardModel, rows: Sequence[Sequence[int]] | np.ndarray,
          lengths: Sequence[int] | None = None, *, pad_id: int = 0) -> np.ndarray:
    """Rewards np.float32 [B] of token rows: `rows` a list of token lists, or an int array
    [B, T] of right-padded rows with their `lengths` [B]. Each row is one sequence (prompt +
    response, as chat_data encodes it); its reward is the head at its last token. Rows are
    padded to a power-of-two length (at least 16) so that a sampler's varying lengths reuse a
    few compilations; padding never reaches a real token (segment id 0)."""
    if lengths is None:
        lengths = [len(r) for r in rows]
        width = max(lengths, default=1)
        array = np.full((len(rows), width), pad_id, np.int32)
        for i, r in enumerate(rows):
            array[i, :len(r)] = r
    else:
        array = np.asarray(rows, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if lengths.size and (lengths.min() < 1 or lengths.max() > array.shape[1]):
        raise ValueError(f"row lengths must be in [1, {array.shape[1]}]; got {lengths.min()} "
                         f"to {lengths.max()}.")
    width = max(16, 1 << int(max(array.shape[1], 1) - 1).bit_length())
    array = np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=pad_id)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(_score(graphdef, params, jnp.asarray(array), jnp.asarray(lengths)))


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, tokens, lengths):
    model = nnx.merge(graphdef, params)
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    segment_ids = (t < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(t, tokens.shape)
    r = model.rewards(tokens, positions, segment_ids)  # [B, T]
    return jnp.take_along_axis(r, (lengths - 1)[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------------
# Export and load.


def save(directory: str, model: RewardModel | dict, *, config: ModelConfig | None = None,
         tokenizer_path: str | None = None, overwrite: bool = False) -> str:
    """Writes a reward model (or its pure parameter dict with `config`) as a params-only export
    whose config.json says `"kind": "reward"`; atomic like checkpoint.save_params."""
    if isinstance(model, RewardModel):
        config, model = model.config, params_of(model)
    elif config is None:
        raise ValueError("reward.save got a parameter dict without config=; pass the "
                         "ModelConfig.")
    return checkpoint.save_params(directory, model, config=config, tokenizer_path=tokenizer_path,
                                  overwrite=overwrite, extra={"kind": KIND})


def is_reward_checkpoint(directory: str) -> bool:
    """True if `directory` is a complete reward export written by `save`."""
    if not checkpoint.is_params_checkpoint(directory):
        return False
    with open(os.path.join(directory, checkpoint.CONFIG_FILE)) as f:
        return json.load(f).get("kind") == KIND


def load(directory: str, *, dtype=None, backend: Backend = PLAIN) -> RewardModel:
    """Restores a reward export onto the first local device; dtype: parameter and compute
    dtype (default as saved)."""
    if not is_reward_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a reward model export (config.json with "
                                f"\"kind\": \"reward\" and params/); train one with "
                                f"experiments/configs/reward.py or write it with reward.save.")
    config = checkpoint.load_config(directory)
    if dtype is not None:
        dtype = jnp.dtype(dtype).name
        config = config.replace(param_dtype=dtype, dtype=dtype)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          params_of(abstract(config)))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(directory),
                                            checkpoint.PARAMS_DIR), target)
    return merge(config, params, backend)
