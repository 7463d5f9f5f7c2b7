"""Pretraining: TrainState, loss, the jitted train and eval steps, and the loop `run()`.

    state = init_state(model, tx)
    step_fn = Step(graphdef, tx, schedule, z_loss=1e-4, microbatches=4)
    state, metrics = train_step(state, batch, step_fn)   # state donated

A batch is a dict of int32 [B, T] arrays: `inputs`, `targets`, `positions`, `segment_ids` and
`loss_mask` (llama_jax.data). The loss is the token-weighted mean cross-entropy over the tokens
with loss_mask 1, so padding and targets across a document boundary are not trained on, and
microbatches are weighted by their token counts (the mean over the whole batch, exactly).

A step whose loss or gradients are not finite is skipped: parameters and optimizer state are
kept, `state.skipped` counts it and `state.bad_streak` counts the consecutive ones, which the
loop (`run`) turns into a clear error once it reaches `train.max_bad_steps`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama_jax import backends, checkpoint, data, decode, evaluation, flops, io, lora, optim
from llama_jax import posttrain
from llama_jax import posttrain_run, resume, sharding, tokenizer_training, train_checkpoint
from llama_jax import tokenizer as tokenizer_lib
from llama_jax.config import ModelConfig
from llama_jax.metrics import MetricsWriter
from llama_jax.model import abstract, create
from llama_jax.sampling import SamplingParams

Batch = dict[str, jax.Array]  # each [B, T] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes. `params` is the pure dict of the model's nnx.Param values
    (nnx.to_pure_dict(nnx.state(model, nnx.Param))), the layout of the params-only export."""

    step: jax.Array  # int32 []: batches consumed so far
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32 []: updates skipped for a non-finite loss or gradient
    bad_streak: jax.Array  # int32 []: consecutive skipped updates ending at `step`


@dataclasses.dataclass(frozen=True)
class Step:
    """The static part of a train step (hashable: one compilation per Step)."""

    graphdef: Any  # nnx.GraphDef of the Llama, from nnx.split(model, nnx.Param)
    tx: optax.GradientTransformation
    # Update count -> learning rate, for logging only. The optimizer counts applied updates
    # (a skipped step keeps its state), so the rate it applies is schedule(step - skipped).
    schedule: Callable[[jax.Array], jax.Array]
    z_loss: float = 0.0  # PaLM's auxiliary loss z_loss * log(Z)^2 (Chowdhery et al. 2022, §5)
    microbatches: int = 1
    # The backend's fused_update(cfg, axes) of the cfg `tx` was made from: the same update,
    # applied, in one pass per parameter; it returns None where it does not apply.
    fused_update: Callable | None = None
    # Post-training (llama_jax.posttrain): fn(params, graphdef, batch) -> (loss, (tokens,
    # metrics)) replacing loss_fn, one pass (no microbatches), its metrics logged with the loss.
    objective: Callable | None = None


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers: the state is donated
    return TrainState(step=zero(), params=params, opt_state=tx.init(params), skipped=zero(),
                      bad_streak=zero())


LOSS_TOKENS = 1024  # tokens per row projected to logits at once in loss_fn


def loss_fn(params, graphdef, batch: Batch, z_loss: float = 0.0, chunk: int = 0,
            frozen=None):
    """Summed (not averaged) masked loss and (sum of cross-entropy, token count).

    Sums rather than means so that microbatches and data-parallel shards combine by addition
    and the final division by the total token count weights every token equally.

    The [B, T, V] float32 logits never exist whole (at 128k vocabulary they outweigh the
    model's activations): the final-norm outputs are projected `chunk` tokens per row at a time
    (0 = LOSS_TOKENS) under remat, so the backward pass recomputes one chunk's logits at a time.
    `frozen`: the state the model also needs but that is not trained (`model_of`).
    """
    model = model_of(graphdef, params, frozen)
    x = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])  # [B, T, D]
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, z = _chunked_cross_entropy(model.unembed, x, batch["targets"], mask,
                                   chunk or LOSS_TOKENS)
    total = ce + z_loss * z if z_loss else ce
    return total, (ce, jnp.sum(mask))


def model_of(graphdef, params, frozen=None):
    """The model of the trained `params` and the `frozen` rest (None: params are all of it;
    with LoRA, params are the adapters and frozen the base, llama_jax.lora)."""
    return nnx.merge(graphdef, combined(params, frozen))


def combined(params: dict, frozen: dict | None) -> dict:
    """One pure dict of the trained and the frozen parameters (disjoint leaves), the form an
    objective (llama_jax.posttrain) merges with the graphdef."""
    if frozen is None:
        return params
    out = dict(frozen)
    for k, v in params.items():
        out[k] = combined(v, frozen[k]) if isinstance(v, dict) and k in frozen else v
    return out


def _chunked_cross_entropy(unembed, x, targets, mask, chunk: int):
    """(Σ mask·CE, Σ mask·log(Z)²) over x [B, T, D], in n chunks of T/n tokens per row, n the
    largest divisor of T with T/n >= chunk. Chunk j takes tokens j, j + n, ...: strided, so
    every data and context shard of T holds an equal part of every chunk (no resharding)."""
    b, t, d = x.shape
    n = max(1, t // max(chunk, 1))
    while t % n:
        n -= 1

    def part(x, targets, mask):
        logits = unembed(x)  # [B, T/n, V] f32
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask)

    if n == 1:  # short rows: one projection, no recompute
        return part(x, targets, mask)
    split = lambda a: jnp.moveaxis(a.reshape(b, t // n, n, *a.shape[2:]), 2, 0)  # noqa: E731
    part = jax.checkpoint(part)  # keep only each chunk's x; its logits are recomputed
    ce, z = jax.lax.map(lambda xs: part(*xs), (split(x), split(targets), split(mask)))
    return jnp.sum(ce), jnp.sum(z)


def _loss_and_grad(s: Step, frozen=None):
    """(params, batch) -> ((cross-entropy sum, tokens), grads of the summed loss with z-loss),
    the form optim.accumulate_gradients weights by tokens."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def fn(params, batch):
        (_, (ce, n)), grads = grad_fn(params, s.graphdef, batch, s.z_loss, frozen=frozen)
        return (ce, n), grads
    return fn


@functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
def train_step(state: TrainState, batch: Batch, s: Step, frozen=None
               ) -> tuple[TrainState, dict]:
    """One optimizer update on the token-weighted mean loss of `batch`; skips non-finite ones.
    `frozen` (not donated, not updated): the untrained rest of the model (`model_of`)."""
    extra = {}
    if s.objective is not None:
        objective = lambda p, g, b: s.objective(combined(p, frozen), g, b)  # noqa: E731
        (loss, (n, extra)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, s.graphdef, batch)
    else:
        (loss, n), grads = optim.accumulate_gradients(_loss_and_grad(s, frozen), state.params,
                                                      batch, s.microbatches)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    fused = s.fused_update and s.fused_update(grads, grad_norm, ok, state.opt_state,
                                              state.params)
    if fused:
        params, opt_state = fused
    else:
        updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(ok, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    bad = (~ok).astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     skipped=state.skipped + bad, bad_streak=(state.bad_streak + 1) * bad)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=s.schedule(state.step - state.skipped),
                   tokens=n, skipped=bad, bad_streak=new.bad_streak, **extra)
    return new, metrics


@functools.partial(jax.jit, static_argnums=(2,))
def eval_step(params, batch: Batch, graphdef, frozen=None) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy, token count) over the loss-masked tokens of `batch`."""
    _, (ce, n) = loss_fn(params, graphdef, batch, frozen=frozen)
    return ce, n


# ----------------------------------------------------------------------------------------------
# The loop: run(config, workdir). Sections: checks, input, model and step, checkpoint, loop,
# evals, export and sample.


def run(config, workdir: str) -> TrainState:
    """Trains `config` (an experiments/configs ConfigDict) in `workdir`, resuming if it can.

    Everything that can be checked cheaply (config values, tokenizer vs vocabulary, sequence
    length, batch vs devices, checkpoints in the workdir this config cannot resume) is checked
    before anything compiles, and nothing is written into the workdir before the config and the
    data have been checked. A workdir that cannot be resumed is refused (llama_jax.resume).
    """
    t_start = time.perf_counter()
    if "://" in workdir:  # os.makedirs would make a local folder named "gs:" instead
        raise ValueError(f"workdir {workdir} is a URL, but checkpoints are written with local "
                         f"file operations (renames, checksums); mount the bucket (Cloud Storage "
                         f"FUSE: gcsfuse) and pass the mounted path.")
    posttrain_run.check(config)
    model_config = posttrain_run.model_config(config)  # post-training: init_from's architecture
    check(config, model_config)
    posttrain_run.check_reference(config, model_config)
    mc = sharding.from_config(config.mesh)  # (data, pipeline, context, tensor) + options
    mesh = sharding.make_mesh(mc)
    sharding.check(mc, mesh, model_config, config.data.seq_len, config.data.global_batch)
    why_restart = resume.check_workdir(workdir, config, model_config)  # with train.restart
    _print(describe_run(config, model_config, workdir))
    tokenizer, tokenizer_file = make_tokenizer(posttrain_run.tokenizer_spec(config), workdir,
                                               config.data)
    check_tokenizer(tokenizer, model_config)
    posttrain_run.check_data(config, tokenizer)  # chat data: bad examples logged, all bad: error
    dcfg = data_config(config.data)
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                 max_seq_len=model_config.max_seq_len)
    make_dataset = posttrain_run.dataset_fn(config)
    train_iter = iter(make_dataset(dcfg, tokenizer, split="train", **shard))
    val_ds = make_dataset(dcfg, tokenizer, split="validation", prefetch=0, **shard)
    eval_sets = evaluation.load_sets(  # train.eval_sets: checked and packed before compiling
        config.train.eval_sets, tokenizer, dcfg, rows=dcfg.global_batch, seq_len=dcfg.seq_len,
        max_tokens=config.train.eval_batches * dcfg.global_batch * dcfg.seq_len)

    backend, parallel = sharding.execution(mesh, mc)
    base_model = posttrain_run.abstract_model(config)(model_config, backend, parallel)
    lcfg = lora.LoraConfig(**config.lora)  # rank 0: every parameter trains, nothing is frozen
    graphdef, abstract_params, abstract_frozen = lora.training_split(base_model, lcfg)
    if lcfg.rank:
        _print(lora.describe(lcfg, abstract_params))
    ocfg = optim_config(config)
    tx = optim.make_optimizer(ocfg, abstract_params)
    fused = backend.fused_update and backend.fused_update(ocfg, abstract_params)
    s = Step(graphdef, tx, optim.make_schedule(ocfg), z_loss=config.train.z_loss,
             microbatches=config.optim.accumulation_steps, fused_update=fused,
             objective=posttrain.objective(config))
    ckpt = train_checkpoint.Manager(
        workdir, model_config, save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints, tokenizer_file=tokenizer_file,
        run_config=config.to_dict())
    built = jax.eval_shape(lambda p: init_state(p, tx), nnx.to_pure_dict(abstract_params))
    why_restart = why_restart or resume.check_state(ckpt, config, built)
    if why_restart:
        ckpt.start_over(why_restart)
    state, start = _initial_state(config, ckpt, train_iter, model_config, tx, built, mesh, mc,
                                  abstract_params)
    frozen = None if abstract_frozen is None else lora.frozen_values(
        abstract_frozen, _base_params(config, model_config, mesh, mc), lcfg)
    step_fn = sharding.jit_step(lambda st, b, *fr: train_step.__wrapped__(st, b, s, *fr), mesh,
                                mc, state, abstract_params, frozen=frozen,
                                frozen_axes=abstract_frozen)
    reference = posttrain_run.reference_fn(config, model_config, *nnx.split(base_model, nnx.Param),
                                           mesh, mc, base=lora.base_params(frozen))
    if reference:  # DPO: the frozen reference's log-probs join each batch
        step_fn = posttrain.with_reference(step_fn, reference)
    put = sharding.array_putter(mesh)
    writer = MetricsWriter(
        workdir, total_steps=config.train.steps, start_step=start,
        flops_per_token=flops.train_flops_per_token(model_config, dcfg.seq_len),
        peak_tflops=flops.device_peak_tflops(cpu_peak_tflops=config.train.cpu_peak_tflops))
    objective_eval = posttrain_run.evaluator(  # dpo, reward: their loss on held-out pairs
        config, graphdef, val_ds, put, reference, lambda p: combined(p, frozen))

    def evaluate(params) -> dict[str, float]:
        held_out = evaluation.results(
            eval_sets, lambda b: eval_step(params, jax.tree.map(put, b), graphdef, frozen),
            process_index=jax.process_index(), process_count=jax.process_count())
        eval_loss = objective_eval(params) if objective_eval else _evaluate(
            params, graphdef=graphdef, ds=val_ds, put=put, n_batches=config.train.eval_batches,
            frozen=frozen)
        return {"eval_loss": eval_loss, **held_out}
    try:
        state = _loop(config, state, step_fn, ckpt, train_iter, put, writer, evaluate, start)
    finally:
        ckpt.close()
        writer.close()
    if int(state.step) >= config.train.steps:
        _print(f"Trained {config.train.steps} steps in {time.perf_counter() - t_start:.0f}s.")
        _finish(config, workdir, model_of(graphdef, state.params, frozen), tokenizer,
                tokenizer_file)
    return state


def _initial_state(config, ckpt, train_iter, model_config, tx, built, mesh, mc,
                   abstract_params):
    """(state, step): the latest checkpoint that restores (onto this mesh), else a fresh state
    or the weights of train.init_from. A workdir none of whose checkpoints restores is refused
    (with train.restart: moved aside); a step whose data-iterator state alone is lost keeps its
    weights and replays the data."""
    if ckpt.steps():
        target = sharding.abstract_state(built, abstract_params, mesh, mc.fsdp)
        restored = ckpt.restore_latest(target, train_iter)
        if restored.state is not None:
            if restored.data_problem:
                resume.replay(train_iter, restored.step, restored.data_problem)
            _print(f"Resumed from step {restored.step} in {ckpt.directory}.")
            return restored.state, restored.step
        ckpt.start_over(resume.no_restorable_step(ckpt, restored.skipped, config))
    if config.lora.rank:  # the adapters train; the base (`_base_params`) is frozen
        return sharding.init_sharded(lambda: init_state(lora.init_adapters(
            model_config, lora.LoraConfig(**config.lora)), tx), mesh, mc, abstract_params), 0
    if config.train.init_from:  # continued pretraining, fine-tuning
        return init_from(config.train.init_from, model_config, tx, mesh, mc, abstract_params,
                         adapt=posttrain_run.adapt_params(config, model_config)), 0
    return sharding.init_sharded(  # every device creates only its own shards
        lambda: init_state(init_params(model_config, config.train.seed), tx), mesh, mc,
        abstract_params), 0


def _base_params(config, model_config: ModelConfig, mesh, mc):
    """The base parameters LoRA adapts (train.init_from, else the seed's), placed by the rules.
    """
    axes = nnx.state(abstract(model_config), nnx.Param)
    if config.train.init_from:
        return load_params(config.train.init_from, model_config, mesh, mc, axes)
    return sharding.init_sharded(lambda: init_params(model_config, config.train.seed), mesh, mc,
                                 axes)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(model_config: ModelConfig, seed: int):
    """The pure parameter dict of create(model_config, seed), initialised in one compiled
    program rather than one dispatch per parameter (seconds saved on CPU)."""
    return nnx.to_pure_dict(nnx.state(create(model_config, seed), nnx.Param))


def init_from(path: str, model_config: ModelConfig, tx, mesh, mc, abstract_params,
              adapt: Callable[[dict], dict] | None = None) -> TrainState:
    """A fresh TrainState (step 0, new optimizer state) around the weights of any checkpoint
    `llama_jax.load` reads (params export, Hugging Face, Meta), placed by the mesh rules.

    The checkpoint's architecture must equal `model_config`'s; execution options (dtypes,
    remat, scan, max_seq_len) and RoPE settings (no parameters: a context-extension stage
    changes them) are the run's. A resumed run ignores it: the workdir wins.
    `adapt` maps the loaded parameter dict to the trained one (a reward model's head)."""
    params = load_params(path, model_config, mesh, mc, abstract_params, adapt)
    shardings = sharding.state_shardings(
        jax.eval_shape(lambda p: init_state(p, tx), params), abstract_params, mesh, mc.fsdp)
    with jax.set_mesh(mesh):
        return jax.jit(lambda p: init_state(p, tx), out_shardings=shardings,
                       donate_argnums=0)(params)


def load_params(path: str, model_config: ModelConfig, mesh, mc, axes,
                adapt: Callable[[dict], dict] | None = None) -> Any:
    """The parameters of checkpoint `path` (`init_from`'s checks), placed by the mesh rules."""
    exec_opts = dict(param_dtype=model_config.param_dtype, dtype=model_config.dtype,
                     scan_layers=model_config.scan_layers, remat=model_config.remat,
                     max_seq_len=model_config.max_seq_len)
    model = io.load(path, **exec_opts)
    theirs, ours = model.config.arch(), model_config.arch()
    diff = [f"{k} {theirs[k]} != {ours[k]}" for k in ours
            if theirs[k] != ours[k] and k not in ("rope_theta", "rope_scaling")]
    if diff:
        raise ValueError(f"train.init_from {path} holds another architecture than config.model "
                         f"({'; '.join(diff)}); use the matching model preset or overrides.")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
    params = adapt(params) if adapt else params
    return jax.device_put(params, sharding.state_shardings(params, axes, mesh, mc.fsdp))


def _loop(config, state, step_fn, ckpt, train_iter, put, writer, evaluate, step):
    """Steps to train.steps, or to the next step boundary after a SIGTERM (saved, returns).

    Metrics of step k are read after step k+1 is dispatched, so logging never idles the device.
    """
    preempted = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.set()) if main else None
    tokens_per_step = posttrain_run.rows(config) * config.data.seq_len
    pending, first = None, step + 1
    try:
        while step < config.train.steps and not preempted.is_set():
            state, metrics = step_fn(state, jax.tree.map(put, next(train_iter)))
            step += 1
            if pending:
                if pending[0] == first:  # its time includes compiling: rates start at its end
                    jax.block_until_ready(pending[1])
                    writer.start_clock(first)
                _report(config, writer, *pending, tokens_per_step)
            pending = (step, metrics)
            ckpt.save(step, state, train_iter, force=step == config.train.steps)
            if config.train.eval_every and step % config.train.eval_every == 0:
                t = time.perf_counter()
                writer.eval(step, evaluate(state.params), seconds=time.perf_counter() - t)
        if pending:
            _report(config, writer, *pending, tokens_per_step)
        if preempted.is_set():
            ckpt.save(step, state, train_iter, force=True)
            ckpt.wait()
            _print(f"SIGTERM: saved step {step} in {ckpt.directory}; exiting.")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return state


def _report(config, writer, step, metrics, tokens_per_step):
    metrics = jax.device_get(metrics)
    if metrics["skipped"]:
        logging.warning("Step %d: non-finite loss (%s) or gradient norm (%s); update skipped.",
                        step, metrics["loss"], metrics["grad_norm"])
    if metrics["bad_streak"] >= config.train.max_bad_steps:
        raise FloatingPointError(
            f"{int(metrics['bad_streak'])} consecutive steps up to step {step} had a non-finite "
            f"loss or gradient; lower optim.peak_lr, check the data, or resume from an earlier "
            f"checkpoint.")
    if step % config.train.log_every == 0 or step == config.train.steps or metrics["skipped"]:
        writer.train(step, metrics, tokens_per_step=tokens_per_step)


def _evaluate(params, *, graphdef, ds, put, n_batches, frozen=None) -> float:
    """Mean cross-entropy over the first n_batches of the held-out split (the same each time)."""
    ce, n = 0.0, 0.0
    for batch in itertools.islice(iter(ds), n_batches):
        c, k = eval_step(params, jax.tree.map(put, batch), graphdef, frozen)
        ce, n = ce + float(c), n + float(k)
    return ce / max(n, 1.0)


def _finish(config, workdir, model, tokenizer, tokenizer_file):
    """Params-only export to workdir/export, and a sample from the trained model. With LoRA
    the export holds the merged weights and workdir/adapter the adapters in PEFT's layout.

    Every process takes part (the export is a collective Orbax save); process 0 prints."""
    if isinstance(tokenizer, tokenizer_lib.ByteTokenizer):  # no file: the export records it
        tokenizer_file = tokenizer_lib.BYTE
    if lora.adapters_of(model):
        path = lora.save_peft(os.path.join(workdir, "adapter"), model,
                              base_model=config.train.init_from, overwrite=True)
        _print(f"Exported the LoRA adapters to {path} (PEFT's layout).")
        model = lora.merge(model)
    path = posttrain_run.save(config)(os.path.join(workdir, "export"), model,
                                      tokenizer_path=tokenizer_file, overwrite=True)
    _print(f"Exported parameters to {path}.")
    if config.train.sample_tokens and config.train.objective != "reward":
        prompt = posttrain_run.sample_prompt(config, tokenizer)
        # Nucleus sampling rather than greedy: a small model's greedy output falls into a
        # repetition loop (e.g. a run of underscores) that hides what it has learnt.
        params = SamplingParams(temperature=config.train.sample_temperature, top_p=0.95)
        out = decode.generate(model, [prompt], config.train.sample_tokens, params,
                              seed=config.train.seed)
        text = tokenizer.decode(out.tokens[0, :out.lengths[0]])
        _print(f"Sample (temperature {params.temperature}, top-p {params.top_p}):\n"
               f"{config.train.sample_prompt}{text}")


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# From the experiment config to the library's pieces.


def make_tokenizer(spec: str, workdir: str, data_cfg):
    """(tokenizer, file to store with checkpoints or None) for a tokenizer spec:

    "byte": UTF-8 bytes (259 ids); a tokenizer.model path (SentencePiece as in LLaMA 1/2, or
    Llama 3's tiktoken file); "train:V": a V-piece SentencePiece BPE trained with LLaMA's options
    (llama_jax.tokenizer_training) on the run's corpus, once, into workdir/tokenizer.model
    (seconds for the stdlib; a resumed run reuses the file).
    """
    if spec == "byte":
        return data.ByteTokenizer(), None
    if spec.startswith("train:"):
        path = os.path.join(workdir, "tokenizer.model")
        if not os.path.isfile(path):
            os.makedirs(workdir, exist_ok=True)
            t = time.perf_counter()
            tokenizer_training.train(os.path.join(workdir, "tokenizer"), files=data_cfg.files,
                                     vocab_size=int(spec[len("train:"):]),
                                     jsonl_field=data_cfg.jsonl_field, max_sentences=200_000)
            print(f"Trained a {spec[6:]}-piece tokenizer in {time.perf_counter() - t:.0f}s: "
                  f"{path}.", flush=True)
        spec = path
    return tokenizer_lib.load_tokenizer(spec), spec


def data_config(section) -> data.DataConfig:
    """config.data as the dataclass it was built from (llama_jax.experiment.section)."""
    return data.DataConfig(**section)


def optim_config(config) -> optim.OptimConfig:
    """config.optim as an OptimConfig whose cosine ends at train.steps."""
    return optim.OptimConfig(**config.optim, total_steps=config.train.steps)


def describe_run(config, model_config: ModelConfig, workdir: str) -> str:
    """What the run is, before anything is built: the two lines that open its output."""
    n = jax.device_count()
    sizes = sharding.mesh_shape(sharding.from_config(config.mesh), n)
    axes = " × ".join(f"{a} {k}" for a, k in zip(sharding.AXES, sizes) if k > 1)
    devices = f"{n} {jax.devices()[0].platform} device{'s' * (n > 1)}"
    rows, t = posttrain_run.rows(config), config.data.seq_len
    backend = backends.get(config.mesh.backend, config.mesh.attention)  # checks both names
    attention = config.mesh.attention
    if attention == "auto":
        attention = backend.default_attention
    return (f"{model_config.name}: {flops.param_count(model_config):,} parameters, "
            f"{rows * t:,} tokens per step ({rows} rows × {t}), {config.train.steps:,} steps\n"
            f"{devices}{' as ' + axes if axes else ''}, backend {backend.name} "
            f"({attention} attention), workdir {workdir}")


def check_tokenizer(tokenizer, model_config: ModelConfig) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_config.vocab_size}; raise model.vocab_size.")


# The smallest value of each count, and what it means or why it cannot be smaller.
MINIMUM = {
    "train.steps": (1, "the number of steps to train"),
    "train.log_every": (1, "metrics are logged every N steps"),
    "train.checkpoint_every": (0, "0 = only at the end and on SIGTERM"),
    "train.keep_checkpoints": (1, "the run resumes from the checkpoints it keeps"),
    "train.eval_every": (0, "0 = never"),
    "train.eval_batches": (1, "set train.eval_every=0 to skip evaluation"),
    "train.max_bad_steps": (1, "consecutive non-finite steps that stop the run"),
    "train.sample_tokens": (0, "0 = no sample"),
    "optim.accumulation_steps": (1, "1 = no gradient accumulation"),
    "optim.warmup_steps": (0, "0 = no warmup"),
}


def check(config, model_config: ModelConfig) -> None:
    """One-sentence errors for a config that cannot train, raised before anything compiles."""
    lora.check(lora.LoraConfig(**config.lora), config.train.objective)
    for key, (least, meaning) in MINIMUM.items():
        section, field = key.split(".")
        if config[section][field] < least:
            raise ValueError(f"{key} is {config[section][field]} but must be >= {least} "
                             f"({meaning}).")
    data.check_config(config.data, process_count=jax.process_count(),
                      max_seq_len=model_config.max_seq_len)
    rows, accumulation = config.data.global_batch, config.optim.accumulation_steps
    data_ranks = sharding.mesh_shape(sharding.from_config(config.mesh), jax.device_count())[0]
    if rows % (accumulation * data_ranks):
        raise ValueError(f"data.global_batch {rows} must be a multiple of "
                         f"optim.accumulation_steps × mesh.data = {accumulation} × "
                         f"{data_ranks}.")
    if config.train.steps <= config.optim.warmup_steps:
        raise ValueError(f"train.steps {config.train.steps} must exceed optim.warmup_steps "
                         f"{config.optim.warmup_steps}; lower the warmup or train longer.")
