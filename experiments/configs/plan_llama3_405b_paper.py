"""Llama 3.1 405B in the Llama 3 paper's main pretraining layout, for tools/plan.py.

"The Llama 3 Herd of Models" (Grattafiori et al. 2024), Table 4, first row: 8,192 H100 GPUs as
TP 8 x PP 16 x DP 64 (CP 1), 8,192-token sequences, 32 sequences per DP rank = 2,048 rows =
16M tokens per step, 430 TFLOP/s per GPU (43% MFU). The recipe itself is llama3_405b.py.

    python tools/plan.py --config=experiments/configs/plan_llama3_405b_paper.py --target=h100:8192

The paper balances its 126 layers over 16 stages by giving the first and last stage one layer
less (§3.3.2); our pipeline needs equal stages, so the plan pads the stack to 128 layers
(+1.6% parameters).
"""

import os

from llama_jax import experiment


def get_config(arg: str = ""):
    del arg
    c = experiment.load(os.path.join(os.path.dirname(__file__), "llama3_405b.py"))
    c.model.n_layers = 128  # 126 + 2: equal stages (see above)
    # 32 rows per data rank, one 8,192-token row per pipeline microbatch: bubble 15/47 rather
    # than 15/31 with 16, and half the activations per loop step; attention: the recipe's
    # `auto`, the target's fused kernel in the pipeline stages (flash attention, as Meta
    # trained, §3.3.4)
    c.mesh.update(data=64, pipeline=16, tensor=8, pipeline_microbatches=32)
    return c
