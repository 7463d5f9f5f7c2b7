"""What train.run does differently for a post-training objective (llama_jax.posttrain), in the
order run() asks: checks, the model config, the tokenizer, the data, the model, the initial
weights, the DPO reference. For `train.objective` "lm" every function here returns what
pretraining uses, so run() reads the same with or without post-training.

Post-training starts from `train.init_from` (HF, Meta or a params export): the architecture is
the checkpoint's (config.model gives only the execution options: dtypes, remat, scan), and the
tokenizer defaults to the checkpoint's tokenizer.model.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable

import jax
from flax import nnx

from llama_jax import chat_data, checkpoint, data, io, model, posttrain, reward, sharding
from llama_jax import config as config_lib
from llama_jax import tokenizer as tokenizer_lib
from llama_jax.config import ModelConfig

EXEC_OPTIONS = ("param_dtype", "dtype", "scan_layers", "remat")


def check(config) -> None:
    """One-sentence errors for a post-training config, before anything is read or built."""
    name = config.train.objective
    if name not in posttrain.OBJECTIVES:
        raise ValueError(f"train.objective {name!r} is unknown; use one of "
                         f"{', '.join(posttrain.OBJECTIVES)}.")
    if name == "lm":
        return
    if not config.train.init_from:
        raise ValueError(f"train.objective {name} starts from a checkpoint; pass "
                         f"--config.train.init_from=DIR (HF, Meta or a llama_jax export).")
    if posttrain.DATA[name] == "preference" and config.optim.accumulation_steps != 1:
        raise ValueError(f"optim.accumulation_steps must be 1 for train.objective {name} (its "
                         f"loss is a mean over pairs, taken in one pass).")
    if name == "reward" and config.train.eval_sets:
        raise ValueError("train.eval_sets measure a language model's loss on text; a reward "
                         "model has none, so leave train.eval_sets empty.")


def checkpoint_config(path: str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, read from its small files only."""
    fmt = io.detect_format(path)
    if fmt == "orbax":
        return checkpoint.load_config(path)
    if fmt == "hf":
        return config_lib.load_hf_config(path)
    from llama_jax import meta
    return meta.MetaReader(path).config


def model_config(config) -> ModelConfig:
    """config.model, or for post-training train.init_from's architecture with config.model's
    execution options."""
    ours = ModelConfig.from_dict(config.model.to_dict())
    if config.train.objective == "lm":
        return ours
    theirs = checkpoint_config(config.train.init_from)
    return theirs.replace(**{k: getattr(ours, k) for k in EXEC_OPTIONS})


def check_reference(config, policy: ModelConfig) -> None:
    """A DPO reference (dpo.reference) must compute over the policy's vocabulary with the
    policy's architecture: one sentence naming the fields that differ."""
    if config.train.objective != "dpo" or not config.dpo.reference:
        return
    theirs, ours = checkpoint_config(config.dpo.reference).arch(), policy.arch()
    diff = [f"{k} {theirs[k]} != {ours[k]}" for k in ours if theirs[k] != ours[k]]
    if diff:
        raise ValueError(f"dpo.reference {config.dpo.reference} differs from the policy "
                         f"(train.init_from) in {'; '.join(diff)}; give a reference of the "
                         f"policy's architecture and vocabulary.")


def tokenizer_spec(config) -> str:
    """data.tokenizer, or for post-training by default train.init_from's tokenizer.model
    (beside the weights, or in original/ as Meta's Hugging Face repositories keep it)."""
    spec = config.data.tokenizer
    if spec or config.train.objective == "lm":
        return spec
    path = config.train.init_from
    found = io.tokenizer_file(path) or (checkpoint.tokenizer_spec(path)
                                        if checkpoint.is_params_checkpoint(path) else None)
    original = os.path.join(path, "original", "tokenizer.model")  # Meta's Llama 3 HF repos
    found = found or (original if os.path.isfile(original) else None)
    if not found:
        raise ValueError(f"train.init_from {path} holds no tokenizer.model; pass "
                         f"--config.data.tokenizer=FILE.")
    return found


def check_data(config, tokenizer) -> None:
    """The chat format exists and the data has good examples (bad ones logged), else one
    sentence; before anything is built."""
    kind = posttrain.DATA[config.train.objective]
    if kind == "text":
        return
    if isinstance(tokenizer, tokenizer_lib.ByteTokenizer):
        raise ValueError("the byte tokenizer has no chat format; post-train a checkpoint with a "
                         "Llama 2 or Llama 3 tokenizer.model (data.tokenizer).")
    chat_data.scan(config.data.files, kind)


def dataset_fn(config) -> Callable:
    """make(cfg, tokenizer, split=..., process_index=..., ...) of the objective's data."""
    kind = posttrain.DATA[config.train.objective]
    if kind == "text":
        return data.make_dataset

    def make(cfg, tokenizer, *, split, process_index, process_count, max_seq_len=None,
             prefetch=2):
        del max_seq_len  # checked by train.check (data.check_config)
        return chat_data.make_dataset(kind, cfg, tokenizer, split=split,
                                      process_index=process_index,
                                      process_count=process_count, prefetch=prefetch)
    return make


def rows(config) -> int:
    """Rows of a step's batch: data.global_batch, twice that for preference pairs (2P rows)."""
    return config.data.global_batch * (2 if posttrain.DATA[config.train.objective]
                                       == "preference" else 1)


def evaluator(config, graphdef, ds, put, reference, full_params: Callable) -> Callable | None:
    """params -> the objective's mean loss over the first train.eval_batches batches of the
    held-out pairs (dpo: with the reference's log-probs), for dpo and reward; None for lm and
    sft, whose held-out loss is train._evaluate's. full_params: trained -> all parameters."""
    objective = posttrain.objective(config)
    if objective is None:
        return None
    loss = jax.jit(lambda p, b: objective(p, graphdef, b)[0])

    def evaluate(params) -> float:
        losses = []
        for batch in itertools.islice(iter(ds), config.train.eval_batches):
            batch = jax.tree.map(put, batch)
            if reference is not None:
                batch = {**batch, "ref_logprobs": reference(batch)}
            losses.append(float(loss(full_params(params), batch)))
        return sum(losses) / len(losses)
    return evaluate


def abstract_model(config) -> Callable:
    """model.abstract, or reward.abstract for the reward objective."""
    return reward.abstract if config.train.objective == "reward" else model.abstract


def adapt_params(config, model_config: ModelConfig) -> Callable[[dict], dict]:
    """What train.init_from does to the loaded language model's parameters: nothing, or for
    the reward objective the trunk plus a fresh head (reward.from_lm)."""
    if config.train.objective != "reward":
        return lambda params: params
    return lambda params: reward.from_lm(params, model_config, config.train.seed)


def reference_fn(config, model_config: ModelConfig, graphdef, abstract_params, mesh, mc,
                 base: dict | None = None):
    """batch -> ref_logprobs [B, T] for DPO: dpo.reference's weights, or train.init_from's,
    loaded once, frozen, placed as the policy's; None for other objectives. `base`: with LoRA,
    the frozen base parameters, which are the reference when dpo.reference is unset (the
    policy with its adapters off; no second copy)."""
    if config.train.objective != "dpo":
        return None
    if base is not None and not config.dpo.reference:
        params = base
    else:
        path = config.dpo.reference or config.train.init_from
        loaded = io.load(path, **{k: getattr(model_config, k) for k in EXEC_OPTIONS})
        params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
        del loaded
        shardings = sharding.state_shardings(params, abstract_params, mesh, mc.fsdp)
        params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        fn = posttrain.reference(graphdef, params)
    return lambda batch: _under(mesh, fn, batch)


def _under(mesh, fn, batch):
    with jax.set_mesh(mesh):
        return fn(batch)


def save(config) -> Callable:
    """The export function of the trained model: checkpoint.save_params or reward.save."""
    return reward.save if config.train.objective == "reward" else checkpoint.save_params


def sample_prompt(config, tokenizer) -> list[int]:
    """The closing sample's prompt: the text, or for SFT and DPO a user turn in chat format."""
    if config.train.objective in ("sft", "dpo"):
        return tokenizer.encode_dialog([{"role": "user", "content": config.train.sample_prompt}])
    return tokenizer.encode(config.train.sample_prompt, bos=True, eos=False)

