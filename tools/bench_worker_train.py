"""Training worker for ../shared/bench/peer_train.py: llama_jax's model, optimizer and train_step.

    python3 ../shared/bench/peer_train.py --worker "ours=.venv/bin/python tools/bench_worker_train.py"
    PEERBENCH_TURNS=2 PEERBENCH_STEPS=2 .venv/bin/python tools/bench_worker_train.py  # standalone

Builds the bench shape from peerproto.shape_from_env() as a ModelConfig, trains with
llama_jax.train.train_step (AdamW + clipping from llama_jax.optim, state donated) on one fixed
random batch, and speaks the peerproto turn protocol. PEERBENCH_PRECISION=bf16 computes in
bfloat16 with float32 weights and optimizer state (MaxText's dtype=bfloat16, weight_dtype=f32).
PEERBENCH_REMAT (none | full | dots) and PEERBENCH_SCAN (0 | 1; 0, unrolled, as the `bench`
preset) choose the execution options;
PEERBENCH_RETAIN_MEMORY=0 leaves glibc's malloc as it is (llama_jax.backends.prepare_host);
LLAMA_JAX_BACKEND (auto | plain | cpu) chooses the backend.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.environ.get("PEERBENCH_DIR", os.path.join(ROOT, "..", "shared", "bench")))

from llama_jax import backends  # noqa: E402

if os.environ.get("PEERBENCH_RETAIN_MEMORY", "1") == "1":  # as experiments/train.py does
    backends.prepare_host(os.environ.get("LLAMA_JAX_BACKEND", "auto"))  # before JAX starts

import jax  # noqa: E402

import peerproto  # noqa: E402
from llama_jax import flops, train  # noqa: E402
from llama_jax.config import ModelConfig  # noqa: E402
from tools import bench_setup  # noqa: E402


def model_config(shape, precision) -> ModelConfig:
    if shape["d_model"] != shape["n_heads"] * shape["head_dim"]:
        raise ValueError(f"bench shape has head_dim {shape['head_dim']} × {shape['n_heads']} "
                         f"heads != d_model {shape['d_model']}; LLaMA needs them equal.")
    return ModelConfig(
        vocab_size=shape["vocab"], dim=shape["d_model"], n_layers=shape["n_layers"],
        n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"], ffn_dim=shape["mlp_dim"],
        max_seq_len=shape["seq"], tie_embeddings=shape["tied"], name="bench",
        dtype="bfloat16" if precision == "bf16" else "float32",
        remat=os.environ.get("PEERBENCH_REMAT", "none"),
        scan_layers=os.environ.get("PEERBENCH_SCAN", "0") == "1")  # the bench preset's


def main():
    shape = peerproto.shape_from_env()
    precision = os.environ.get("PEERBENCH_PRECISION", "f32")
    config = model_config(shape, precision)
    backend = backends.get(os.environ.get("LLAMA_JAX_BACKEND", "auto"))
    # one fixed batch of random tokens, `seq` inputs and targets per row, like the peers
    step_fn, state, data = bench_setup.train_setup(config, backend, shape["batch"], shape["seq"])
    st = {"state": state}

    def sync():
        jax.block_until_ready(st["state"])

    info = {"system": "llama_jax", "jax": jax.__version__, "precision": precision,
            "remat": config.remat, "scan": config.scan_layers,
            "retain_host_memory": os.environ.get("PEERBENCH_RETAIN_MEMORY", "1") == "1",
            "train_flops_per_token": flops.train_flops_per_token(config, shape["seq"])}
    gate = peerproto.Gate(warmup_steps=int(os.environ.get("PEERBENCH_WARMUP", "2")), sync=sync,
                          info=info)
    while True:
        gate.before_step()
        st["state"], _ = train.train_step(st["state"], data, step_fn)
        gate.after_step()


if __name__ == "__main__":
    main()
