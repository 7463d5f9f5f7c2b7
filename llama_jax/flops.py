"""FLOP counts, throughput and model FLOPs utilisation (MFU): the one place for these formulas.

Training FLOPs per token follow MaxText (`maxtext_utils.calculate_tflops_training_per_device`),
the formula the shared benchmark (../shared/bench/peerproto.py) reports:

    6 · (N_layer_matmul + N_head)          2 FLOPs per weight per token forward, 4 backward
    + 6 · L · T · N · H                    causal attention: QK^T and PV are 4·T·N·H per token
                                           and layer forward, halved by causality, ×3 for fwd+bwd

The input embedding is a gather and is not counted; rematerialised recomputation is not counted
either (MFU measures useful work, so remat lowers it, as it should). The LM head is counted
whether or not it is tied to the embedding: it is a matmul either way.
"""

from __future__ import annotations

import jax

from llama_jax import hardware
from llama_jax.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip (per JAX device), matched against `device.device_kind`; the
# numbers and their sources live in llama_jax.hardware (the planner's device table).
DEVICE_PEAK_TFLOPS = hardware.peak_tflops_by_kind()


def layer_matmul_params(c: ModelConfig) -> int:
    """Weights of the L layers' matmuls: q, k, v, o projections and the SwiGLU gate, up, down."""
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.dim * c.ffn_dim
    return c.n_layers * (attn + mlp)


def head_params(c: ModelConfig) -> int:
    return c.dim * c.vocab_size


def param_count(c: ModelConfig) -> int:
    """Every parameter, from the config alone: embedding (and untied head), the layers'
    matmuls, and the RMSNorm gains (two per layer and the final one)."""
    embeddings = head_params(c) * (1 + (not c.tie_embeddings))
    return embeddings + layer_matmul_params(c) + c.dim * (2 * c.n_layers + 1)


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Forward causal attention (scores and context) per token: 2 · L · T · N · H."""
    return 2.0 * c.n_layers * seq_len * c.n_heads * c.head_dim


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a sequence of `seq_len` tokens."""
    return 2.0 * (layer_matmul_params(c) + head_params(c)) + attention_flops_per_token(c, seq_len)


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, MaxText's formula (3 × forward)."""
    return 3.0 * forward_flops_per_token(c, seq_len)


def device_peak_tflops(device: jax.Device | None = None, cpu_peak_tflops: float = 0.0) -> float:
    """bf16 dense peak TFLOP/s of one device; on CPU (or an unknown device) `cpu_peak_tflops`.

    Longer keys first, so that "TPU v5 lite" is not taken for "TPU v5".
    """
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return cpu_peak_tflops
    kind = device.device_kind
    for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return DEVICE_PEAK_TFLOPS[key]
    return cpu_peak_tflops


def tflops_per_device(tokens_per_s: float, flops_per_token: float, n_devices: int) -> float:
    """Achieved TFLOP/s per device from the global token throughput."""
    return tokens_per_s * flops_per_token / n_devices / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; 0 when the peak is unknown (<= 0)."""
    if peak_tflops <= 0:
        return 0.0
    return tflops_per_device(tokens_per_s, flops_per_token, n_devices) / peak_tflops
