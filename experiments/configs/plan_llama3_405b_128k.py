"""Llama 3.1 405B in the Llama 3 paper's long-context layout, for tools/plan.py.

"The Llama 3 Herd of Models", Table 4, last row: 16,384 H100 GPUs as TP 8 x CP 16 x PP 16 x
DP 8, 131,072-token sequences, 16 sequences per DP rank = 128 rows = 16M tokens per step,
380 TFLOP/s per GPU (38% MFU). Context parallelism gathers K and V (§3.3.2: "all-gather based").

    python tools/plan.py --config=experiments/configs/plan_llama3_405b_128k.py --target=h100:16384

Same 128-layer padding as plan_llama3_405b_paper.py.
"""

import os

from llama_jax import experiment


def get_config(arg: str = ""):
    del arg
    c = experiment.load(os.path.join(os.path.dirname(__file__), "llama3_405b.py"))
    c.model.n_layers = 128  # 126 + 2: equal pipeline stages
    c.model.max_seq_len = 131072
    c.data.seq_len, c.data.global_batch = 131072, 128
    # attention `auto`: the target's kernel on local queries vs gathered keys (splash on
    # TPU; on GPU pallas_gpu, which runs chunked under context parallelism)
    c.mesh.update(data=8, pipeline=16, context=16, tensor=8, pipeline_microbatches=16)
    return c
