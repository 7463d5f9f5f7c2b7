"""FLOP formulas: the shared benchmark's quoted number and an independent count from the model."""

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import flops


def test_bench_shape_matches_maxtext_number():
    # ../shared/bench/README.md: "173.0 MFLOP/token for training (MaxText's formula)".
    c = llama_jax.get_config("bench")
    assert flops.train_flops_per_token(c, 512) / 1e6 == pytest.approx(173.0, abs=0.05)


@pytest.mark.parametrize("name", ["bench", "llama3-8b", "llama3.2-1b"])
def test_matmul_weights_match_the_model_parameters(name):
    """Counts the matmul weights from the (abstract) model itself, not from the formula."""
    c = llama_jax.get_config(name)
    pure = nnx.to_pure_dict(nnx.state(llama_jax.abstract(c), nnx.Param))
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    layers = pure["layers"]
    assert flops.layer_matmul_params(c) == size(layers["attn"]) + size(layers["mlp"])
    head = pure["embed"] if c.tie_embeddings else pure["lm_head"]
    assert flops.head_params(c) == size(head)
    t = 1024
    expected = 6 * (size(layers["attn"]) + size(layers["mlp"]) + size(head))
    expected += 6 * c.n_layers * t * c.n_heads * c.head_dim
    assert flops.train_flops_per_token(c, t) == pytest.approx(expected, rel=1e-12)
    assert flops.forward_flops_per_token(c, t) == pytest.approx(expected / 3, rel=1e-12)


class _Dev:
    def __init__(self, platform, kind):
        self.platform, self.device_kind = platform, kind


def test_device_peaks_and_mfu():
    assert flops.device_peak_tflops(_Dev("tpu", "TPU v5 lite")) == 197.0
    assert flops.device_peak_tflops(_Dev("tpu", "TPU v5")) == 459.0
    assert flops.device_peak_tflops(_Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989.0
    assert flops.device_peak_tflops(_Dev("cpu", "cpu"), cpu_peak_tflops=0.19) == 0.19
    # 1000 tok/s × 1e9 FLOP/token on 2 devices = 0.5 TFLOP/s each = 50% of a 1 TFLOP/s peak.
    assert flops.tflops_per_device(1000, 1e9, 2) == pytest.approx(0.5)
    assert flops.mfu(1000, 1e9, 2, 1.0) == pytest.approx(0.5)
    assert flops.mfu(1000, 1e9, 2, 0.0) == 0.0
