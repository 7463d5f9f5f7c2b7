"""LLaMA-1 65B as trained (Touvron et al. 2023), for tools/plan.py.

§2.4: 2,048 A100 80GB GPUs, about 380 tokens/s/GPU, 4M-token batches of 2,048-token sequences
(2,048 rows), activation checkpointing, model and sequence parallelism (Korthikanti et al.
2022). The paper does not give the split; this plans tensor 8 inside each node and FSDP over
the 256 nodes. The recipe itself is llama1_65b.py.

    python tools/plan.py --config=experiments/configs/plan_llama1_65b.py --target=a100:2048
"""

from experiments.configs import llama1_65b


def get_config(arg: str = ""):
    del arg
    c = llama1_65b.get_config()
    with c.unlocked():
        if "mesh" not in c:  # common.base has one once the sharding change is in
            c.mesh = {}
        c.mesh.update(data=256, pipeline=1, context=1, tensor=8,
                      attention="chunked")  # §2.4: xformers memory-efficient attention
    return c
