"""The experiment config: one locked ml_collections.ConfigDict per run, built from the
library's own dataclasses so that every key is declared once.

    c = experiment.base("llama3-8b")         # what a config file's get_config(arg) starts from
    c = experiment.load("experiments/configs/tiny.py:test")   # a config file, by path

Sections: model (a config.ModelConfig as a dict: any field can be overridden from the command
line, e.g. --config.model.remat=full), data (data.DataConfig: corpus, tokenizer, rows), optim
(optim.OptimConfig: the LLaMA recipe, AdamW β 0.9/0.95, weight decay 0.1, clip 1.0, warmup then
cosine to 10%, LLaMA paper §2.3; its total_steps is train.steps), mesh (sharding.MeshConfig:
data, pipeline, context, tensor and the parallel options) and train (the loop: length, logging,
evals, checkpoints, the closing sample). The first four take their keys and defaults from the
dataclass fields, so a field added there is a config key here; `base` sets only the values
where an experiment's default differs from the library's.

Config files import only this package, so they load from any directory, beside a checkout or
an installed wheel.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import ml_collections

from llama_jax import data, lora, optim, posttrain, sharding
from llama_jax.config import get_config as model_config

# The fields a run fills in itself rather than reading from its section.
RUN_FIELDS = {optim.OptimConfig: ("total_steps",)}  # = train.steps


def section(cls, **values) -> ml_collections.ConfigDict:
    """The config section of dataclass `cls`: its fields with their defaults, `values` set."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)
              if f.name not in RUN_FIELDS.get(cls, ())}
    unknown = set(values) - set(fields)
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {sorted(unknown)}.")
    return ml_collections.ConfigDict({**fields, **values})


def base(model: str) -> ml_collections.ConfigDict:
    """The defaults around the named model preset of llama_jax.config.PRESETS (unlocked)."""
    c = ml_collections.ConfigDict()
    c.model = model_config(model).to_dict()
    c.data = section(data.DataConfig)  # the stdlib's source, bytes, 8 rows of 2,048
    c.optim = section(optim.OptimConfig)
    c.mesh = section(sharding.MeshConfig)  # data -1: every device not used by another axis
    c.dpo = section(posttrain.DPOConfig)  # read when train.objective is "dpo"
    c.lora = section(lora.LoraConfig)  # rank 0: full training

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000  # also the end of the cosine schedule
    c.train.seed = 0  # parameter initialisation
    c.train.init_from = ""  # start from these weights (params export, HF or Meta directory)
    # lm (pretraining), or post-training from init_from (llama_jax.posttrain): sft, dpo, reward
    c.train.objective = "lm"
    c.train.z_loss = 0.0  # PaLM's log(Z)^2 coefficient (1e-4 there); 0 = off
    c.train.log_every = 10
    c.train.eval_every = 500  # 0 = never
    c.train.eval_batches = 8
    # Held-out sets also reported every eval_every steps (loss, perplexity, bits per byte),
    # comma-separated NAME=GLOB or "validation", each up to eval_batches batches of documents
    # (llama_jax.evaluation); "" = none beyond eval_loss.
    c.train.eval_sets = ""
    c.train.checkpoint_every = 500  # 0 = only at the end and on SIGTERM
    c.train.keep_checkpoints = 3  # >= 1
    # A workdir whose checkpoints this config cannot resume (another model, batch shape or
    # optimizer structure, or none restores) is refused; True starts over in it instead (the
    # old run is kept in WORKDIR/previous_run until the new one saves a step). Checkpoints
    # that restore are always resumed, so a relaunch with the flag continues the new run.
    c.train.restart = False
    c.train.max_bad_steps = 10  # consecutive non-finite steps that stop the run
    c.train.cpu_peak_tflops = 0.19  # ../shared/bench: 190 GFLOP/s f32 matmul on 2 cores
    c.train.sample_prompt = "def "
    c.train.sample_tokens = 64  # sample printed at the end; 0 = none
    c.train.sample_temperature = 0.8  # 0 = greedy
    return c


def paper_recipe(model: str, *, peak_lr: float, batch_tokens: int, seq_len: int,
                 warmup_steps: int, train_tokens: float = 0.0, steps: int = 0,
                 end_lr_fraction: float = 0.1) -> ml_collections.ConfigDict:
    """A published pretraining recipe: global batch = batch_tokens / seq_len rows, steps as
    given or train_tokens / batch_tokens; bf16 compute, f32 master weights, full remat (locked).
    """
    c = base(model)
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.data.seq_len = seq_len
    c.data.global_batch = batch_tokens // seq_len
    c.optim.peak_lr, c.optim.warmup_steps = peak_lr, warmup_steps
    c.optim.end_lr_fraction = end_lr_fraction
    c.train.steps = steps or math.ceil(train_tokens / batch_tokens)
    c.train.eval_every, c.train.checkpoint_every = 1000, 1000
    c.data.tokenizer = "tokenizer.model"  # set --config.data.tokenizer to the release's file
    c.lock()
    return c


def load(path: str) -> ml_collections.ConfigDict:
    """The config of the file `path[:arg]`: its get_config(arg), as --config=path[:arg] gives."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}; give the path of a get_config(arg) "
                                f"file such as experiments/configs/tiny.py.")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def post_training(objective: str) -> ml_collections.ConfigDict:
    """Post-training (sft, dpo, reward; llama_jax.posttrain) from --config.train.init_from.

    The architecture and the tokenizer are the checkpoint's (posttrain_run.model_config):
    config.model gives only execution options (bf16 compute over f32 master weights, full
    remat). Learning rate 1e-5 as Llama 3's SFT and DPO (paper §4.1.3-4), unlocked."""
    c = base("tiny")  # the architecture fields are replaced by the checkpoint's
    # max_seq_len too is the checkpoint's; this one only bounds data.seq_len in the checks
    c.model.update(dtype="bfloat16", remat="full", name="init_from", max_seq_len=8192)
    c.train.objective = objective
    c.data.tokenizer = ""  # "": the tokenizer.model of train.init_from
    c.data.name = objective
    c.data.seq_len, c.data.global_batch = 4096, 64
    c.optim.peak_lr, c.optim.warmup_steps = 1e-5, 100
    c.train.steps = 2000
    c.train.log_every, c.train.checkpoint_every = 10, 500
    c.train.sample_prompt = "Write a haiku about gradient descent."
    c.train.sample_tokens = 64
    if objective == "reward":
        c.train.sample_tokens = 0  # a reward model does not generate
    return c


def post_training_test(c: ml_collections.ConfigDict) -> None:
    """Shrinks a post-training config to the seconds the tests train (`:test`)."""
    c.model.update(dtype="float32", remat="none", scan_layers=False)
    c.data.seq_len, c.data.global_batch = 48, 4
    c.optim.peak_lr, c.optim.warmup_steps = 1e-3, 0
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 0  # 0: at the end
    c.train.eval_every, c.train.sample_tokens = 0, 0
