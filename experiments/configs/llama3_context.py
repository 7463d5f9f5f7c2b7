"""Llama 3's long-context pre-training as a chain of runs, each starting from the previous one.

"The Llama 3 Herd of Models" §3.4.2: after pre-training at 8K tokens, the context is raised in
stages to 128K (six stages there, ~800B tokens in all; the stage lengths are not published),
each stage trained until short-context scores recover and needle-in-a-haystack retrieval is
solved at that length. Here stage k doubles the rows of stage k-1 and starts from its export
(train.init_from); the 8B chain starts from llama3_8b.py's run as stage 0:

    python experiments/train.py --config=experiments/configs/llama3_8b.py --workdir=ROOT/stage0
    python experiments/train.py --config=experiments/configs/llama3_context.py:8b,1,ROOT \\
        --workdir=ROOT/stage1 --config.data.tokenizer=... --config.data.files=...
    ... stages 2-4 alike (ROOT/stage{k-1}/export is read, ROOT/stage{k} written)

arg = SIZE,STAGE,ROOT. Per stage (our choices where the paper gives none, marked so):
- rows of 8K·2^k tokens (16K, 32K, 64K, 128K), the model's max_seq_len with them;
- RoPE: θ 500,000 as in pre-training, with Llama 3.1's frequency scaling (config.RopeScaling,
  original length 8K) at factor seq_len / 16K: none at 16K, 2, 4, then the released 128K
  models' factor 8 at 128K (the per-stage factors in between are ours);
- context parallelism over seq_len / 16K devices, so every device holds 16K tokens of a row
  (ours; §3.3.2 splits 128K rows over 16 context ranks for 405B);
- 16M tokens per step as at the end of pre-training, 12,000 steps per stage (~800B tokens over
  four stages), peak LR 3e-5 after 100 warmup steps (ours).
Check each stage with tools/needle.py at its length and tools/lm_eval.py on short tasks.

SIZE tiny is the same chain on a CPU (BENCHMARKS.md, "Long context"): a byte-level model trained
from scratch at 64 tokens in stage 0, then 128 and 256 (256 over 2 context ranks:
XLA_FLAGS=--xla_force_host_platform_device_count=2).
"""

from llama_jax import experiment

# (base row length, rows per device before context parallelism, tokens per step)
SIZES = {"8b": ("llama3-8b", 8192, 16384, 2048 * 8192), "tiny": ("tiny", 64, 128, 16 * 128)}


def get_config(arg: str = "8b,1,/tmp/llama3_context"):
    try:
        size, stage, root = arg.split(",")
        stage = int(stage)
        preset, base_len, per_device, step_tokens = SIZES[size]
    except (ValueError, KeyError):
        raise ValueError(f"llama3_context.py takes SIZE,STAGE,ROOT with SIZE in {sorted(SIZES)}"
                         f", e.g. 8b,1,/runs/ctx; got {arg!r}.") from None
    if not (1 <= stage <= 4 if size == "8b" else 0 <= stage <= 2):
        raise ValueError(f"stage {stage} is not in this chain: 8b has stages 1-4 (its stage 0 "
                         "is llama3_8b.py), tiny 0-2.")
    seq_len = base_len * 2 ** stage
    c = _tiny() if size == "tiny" else experiment.paper_recipe(
        preset, peak_lr=3e-5, batch_tokens=step_tokens, seq_len=seq_len, warmup_steps=100,
        steps=12_000)
    c.unlock()
    c.data.seq_len, c.model.max_seq_len = seq_len, seq_len
    c.data.global_batch = step_tokens // seq_len
    c.mesh.context = max(1, seq_len // per_device)
    if stage:
        c.train.init_from = f"{root}/stage{stage - 1}/export"
    if seq_len > 2 * base_len:  # factor seq_len / (2 × base): 8 at 16 × base (128K)
        c.model.rope_scaling = dict(factor=seq_len / (2 * base_len), low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position=base_len)
    c.lock()
    return c


def _tiny():
    """tiny.py's byte-level model at D 64, L 2 with a short schedule per stage."""
    c = experiment.base("tiny")
    c.model.update(vocab_size=259, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=192,
                   rope_theta=500000.0, name="tiny-context", scan_layers=False)
    c.optim.peak_lr, c.optim.warmup_steps = 3e-3, 10
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 150, 25, 150, 2
    c.train.checkpoint_every, c.train.keep_checkpoints, c.train.sample_tokens = 0, 1, 0
    return c
