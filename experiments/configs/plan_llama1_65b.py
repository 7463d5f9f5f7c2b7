"""LLaMA-1 65B as trained (Touvron et al. 2023), for tools/plan.py.

§2.4: 2,048 A100 80GB GPUs, about 380 tokens/s/GPU, 4M-token batches of 2,048-token sequences
(2,048 rows), activation checkpointing, model and sequence parallelism (Korthikanti et al.
2022). The paper does not give the split; this plans tensor 8 inside each node and FSDP over
the 256 nodes. The recipe itself is llama1_65b.py.

    python tools/plan.py --config=experiments/configs/plan_llama1_65b.py --target=a100:2048
"""

import os

from llama_jax import experiment


def get_config(arg: str = ""):
    del arg
    c = experiment.load(os.path.join(os.path.dirname(__file__), "llama1_65b.py"))
    # attention: the recipe's `auto`, the target's fused kernel (pallas_gpu on GPU), as
    # xformers' efficient attention was (§2.4)
    c.mesh.update(data=256, tensor=8)
    return c
