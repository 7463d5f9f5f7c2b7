"""Defaults shared by every experiment config; each config file sets only what differs.

Sections: model (a ModelConfig as a dict: any field can be overridden from the command line,
e.g. --config.model.remat=full), data (llama_jax.data.DataConfig plus the tokenizer), optim
(the LLaMA recipe: AdamW β 0.9/0.95, weight decay 0.1, clip 1.0, warmup then cosine to 10%;
LLaMA paper §2.3), mesh (llama_jax.sharding.MeshConfig: data, pipeline, context, tensor) and
train (length, logging, evals, checkpoints).
"""

import math

import ml_collections

from llama_jax.config import get_config as model_config


def base(model: str) -> ml_collections.ConfigDict:
    """The defaults around the named model preset of llama_jax.config.PRESETS (unlocked)."""
    c = ml_collections.ConfigDict()
    c.model = model_config(model).to_dict()

    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = "byte"  # "byte" (UTF-8 bytes, 259 ids) or a tokenizer.model path
    c.data.name = "stdlib"  # corpus name: the Python standard library's source by default
    c.data.files = ""  # glob of text / JSONL files, one document each; "" = the stdlib
    c.data.jsonl_field = "text"
    c.data.data_dir = ""  # TFDS data_dir; "" = ~/.cache/llama_jax/tfds
    c.data.seq_len = 2048  # T
    c.data.global_batch = 8  # rows per step over all processes
    c.data.seed = 0
    c.data.shuffle = True

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.end_lr_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.decay_embeddings = True
    c.optim.microbatches = 1  # gradient accumulation, weighted by tokens

    c.mesh = ml_collections.ConfigDict()  # llama_jax.sharding.MeshConfig; one size may be -1
    c.mesh.data = -1  # batch + FSDP (parameters, gradients, optimizer state sharded)
    c.mesh.pipeline = 1
    c.mesh.context = 1
    c.mesh.tensor = 1
    c.mesh.fsdp = True  # False: parameters replicated over data
    c.mesh.context_impl = "all_gather"  # or "ring"
    c.mesh.backend = "auto"  # llama_jax.backends: "cpu" where JAX runs on the CPU, else "plain"
    c.mesh.attention = "auto"  # the backend's default ("full" on cpu), "reference", "chunked"
    c.mesh.microbatches = 0  # pipeline microbatches; 0 = one per stage
    c.mesh.repeats = 1  # circular pipeline repeats; 1 = GPipe

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000  # also the end of the cosine schedule
    c.train.seed = 0  # parameter initialisation
    c.train.init_from = ""  # start from these weights (params export, HF or Meta directory)
    c.train.z_loss = 0.0  # PaLM's log(Z)^2 coefficient (1e-4 there); 0 = off
    c.train.log_every = 10
    c.train.eval_every = 500  # 0 = never
    c.train.eval_batches = 8
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
