"""What the notebooks (notebooks/*.ipynb) call beside the library: a small checkpoint when none
is at hand, a memory check that names the setting to lower, streamed text, and the loss and
learning-rate curves of a run (layout pictures and TPU memory tables: notebook_mesh.py).

    path = notebook.checkpoint_or_small(CHECKPOINT, "/tmp/nb")   # "" builds a small one
    path = notebook.chat_checkpoint(CHECKPOINT, "/tmp/nb")       # the same with a chat tokenizer
    notebook.check_fits(config, purpose="load", dtype="float32")  # MemoryError: what to lower
    fig = notebook.plot_metrics(workdir)                          # loss, eval loss, lr by step

Nothing here assumes a device kind: memory comes from the device's own statistics (GPU, TPU)
or the host's available RAM (CPU).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from llama_jax import checkpoint, config as config_lib, decode, flops, io, tokenizer

GiB = 2**30

# A byte-level LLaMA of tiny.py:test's shape: what `checkpoint_or_small` builds.
SMALL = config_lib.ModelConfig(name="small-bytes", vocab_size=259, dim=64, n_layers=2,
                               n_heads=2, n_kv_heads=1, ffn_dim=192, max_seq_len=256,
                               scan_layers=False)


# ----------------------------------------------------------------------------------------------
# A checkpoint to load.


def checkpoint_or_small(path: str, scratch: str) -> str:
    """`path` if it is a checkpoint directory; "" builds a small random byte-level one (SMALL)
    in scratch/small (once) and returns its path. A path that does not exist says how to get
    either."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"CHECKPOINT = {path!r} does not exist; set CHECKPOINT = '' to build a small "
                f"random one in this notebook, or point it at a Hugging Face / Meta / llama_jax "
                f"export directory (tools/convert_checkpoint.py makes one).")
        io.detect_format(path)  # a directory that holds no checkpoint: one sentence now
        return path
    small = os.path.join(scratch, "small")
    if not checkpoint.is_params_checkpoint(small):
        from llama_jax import model
        checkpoint.save_params(small, model.create(SMALL, 0), tokenizer_path=tokenizer.BYTE,
                               overwrite=True)
    return small


# A model small enough to fine-tune on a CPU in seconds, with a SentencePiece tokenizer (Llama
# 2's chat format) of CHAT_VOCAB pieces trained on the Python standard library's source (present
# everywhere): what `chat_checkpoint` builds when no checkpoint is given.
CHAT_VOCAB = 512
SMALL_CHAT = config_lib.ModelConfig(name="small-chat", vocab_size=CHAT_VOCAB, dim=64,
                                    n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=192,
                                    max_seq_len=256, scan_layers=False)


def chat_checkpoint(path: str, scratch: str) -> str:
    """`path` if it is a checkpoint directory (with its chat tokenizer); "" builds, once, a
    random SMALL_CHAT export in scratch/small-chat with its tokenizer (seconds)."""
    if path:
        return checkpoint_or_small(path, scratch)
    small = os.path.join(scratch, "small-chat")
    if not checkpoint.is_params_checkpoint(small):
        from llama_jax import model, tokenizer_training
        spm = tokenizer_training.train(os.path.join(scratch, "tokenizer"),
                                       vocab_size=CHAT_VOCAB, max_sentences=50_000)
        m = model.create(SMALL_CHAT, 0)
        # Initialised as Hugging Face does (std 0.02), the head's logits span about one nat, and
        # with it frozen under LoRA no answer could become likely; a trained head spans tens.
        m.lm_head[...] = m.lm_head[...] * 16
        checkpoint.save_params(small, m, tokenizer_path=spm, overwrite=True)
    return small


def checkpoint_config(path: str) -> config_lib.ModelConfig:
    """The ModelConfig of checkpoint directory `path`, read from its small files only."""
    fmt = io.detect_format(path)
    if fmt == "orbax":
        return checkpoint.load_config(path)
    if fmt == "hf":
        return config_lib.load_hf_config(path)
    from llama_jax import meta
    return meta.MetaReader(path).config  # reads the shard headers, not the weights


def load_tokenizer(path: str):
    """The tokenizer stored with checkpoint `path` (a file beside it, or "byte"), else None."""
    spec = io.tokenizer_file(path) or checkpoint.tokenizer_spec(path)
    return tokenizer.load_tokenizer(spec) if spec else None


# ----------------------------------------------------------------------------------------------
# Memory: does the model fit this runtime, and if not, which setting to lower.


def device_memory() -> tuple[float, str]:
    """(bytes one device can hold, where the number comes from): the accelerator's own limit,
    or on a CPU runtime the host memory available now."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{dev.device_kind} memory"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return float(info["MemAvailable"].split()[0]) * 1024, "available host RAM"
    except (OSError, KeyError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return float(pages), "available host RAM"


def bytes_needed(cfg: config_lib.ModelConfig, purpose: str, dtype: str = "float32",
                 rows: int = 1, seq_len: int = 0) -> float:
    """Rough bytes on one device, parameters and optimizer state split over the devices (FSDP):
      load, decode: the weights in `dtype`;
      train: f32 weights, gradients and AdamW's two moments (16 bytes a parameter) plus the
        activations kept for the backward pass (~34 values of D per token and layer without
        remat, Korthikanti et al. 2022);
      lora: the frozen f32 base (4 bytes a parameter; the adapters are small) plus the same
        activations."""
    n = flops.param_count(cfg)
    if purpose in ("load", "decode"):
        return n * np.dtype(dtype).itemsize
    if purpose not in ("train", "lora"):
        raise ValueError(f"purpose {purpose!r} must be 'load', 'decode', 'train' or 'lora'.")
    devices = jax.device_count()
    acts = 34 * rows * (seq_len or cfg.max_seq_len) * cfg.dim * cfg.n_layers * 2 / devices
    return (16 if purpose == "train" else 4) * n / devices + acts


_SMALLER = "or a smaller CHECKPOINT (e.g. Llama 3.2 1B)"
LOWER = {"load": f"set DTYPE = 'bfloat16' (half the bytes) {_SMALLER}",
         "decode": f"set DTYPE = 'bfloat16' (half the bytes) {_SMALLER}",
         "train": "lower config.data.global_batch or config.data.seq_len, or train a smaller "
                  "model (config.model)",
         "lora": f"lower config.data.global_batch or config.data.seq_len, {_SMALLER}"}


def check_fits(cfg: config_lib.ModelConfig, purpose: str, dtype: str = "float32",
               rows: int = 1, seq_len: int = 0, available: float | None = None) -> float:
    """Raises MemoryError naming the setting to lower when `purpose` needs more than one device
    of this runtime holds; returns the bytes needed otherwise. Checked before anything is
    allocated, so a too-large model fails in a second rather than killing the kernel."""
    need = bytes_needed(cfg, purpose, dtype, rows, seq_len)
    have, what = (available, "the given memory") if available else device_memory()
    if need > 0.9 * have:  # headroom for XLA's own buffers and the Python process
        raise MemoryError(f"{cfg.name} needs about {need / GiB:.1f} GiB per device to {purpose} "
                          f"but this runtime has {have / GiB:.1f} GiB ({what}); "
                          f"{LOWER[purpose]}.")
    return need


# ----------------------------------------------------------------------------------------------
# Text as it is generated.


TextStream = decode.TextStream  # the notebooks' name for decode's stream printer


# ----------------------------------------------------------------------------------------------
# Pictures.


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} from WORKDIR/metrics.jsonl (train lines and eval lines)."""
    series: dict[str, tuple[list, list]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key != "step":
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(row["step"])
                    values.append(value)
    return {k: (np.array(s), np.array(v)) for k, (s, v) in series.items()}


def plot_metrics(workdir: str):
    """A matplotlib figure: training and held-out loss (nats per token), and the learning rate,
    against the step."""
    import matplotlib.pyplot as plt
    m = read_metrics(workdir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(*m["loss"], label="train")
    if "eval_loss" in m:
        left.plot(*m["eval_loss"], "o-", label="held-out")
    left.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    left.legend()
    right.plot(*m["lr"])
    right.set(xlabel="step", ylabel="learning rate", title="warmup, then cosine")
    fig.tight_layout()
    return fig
