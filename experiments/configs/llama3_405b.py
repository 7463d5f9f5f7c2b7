"""Llama 3 405B pretraining ("The Llama 3 Herd of Models", Grattafiori et al. 2024).

Table 3: peak learning rate 8e-5. §3.4.1 (stated for 405B; the paper gives no separate schedule
for 8B/70B, so those reuse it): AdamW, linear warmup over 8,000 steps, cosine decay to 8e-7
(1% of 405B's 8e-5 peak) over 1,200,000 steps; batch 4M tokens of 4,096-token sequences,
doubled to 8M tokens of 8,192 after 252M tokens, doubled to 16M after 2.87T tokens, 15.6T tokens
in all. This config is the main stage: 2,048 sequences × 8,192 tokens = 16M tokens per step.

    python experiments/train.py --config=experiments/configs/llama3_405b.py --workdir=DIR \
        --config.data.tokenizer=/path/llama3/tokenizer.model --config.data.files='/data/*.jsonl'
"""

from llama_jax import experiment


def get_config(arg: str = ""):
    del arg
    return experiment.paper_recipe(
        "llama3.1-405b", peak_lr=8e-5, batch_tokens=2048 * 8192, seq_len=8192, warmup_steps=8000,
        steps=1_200_000, end_lr_fraction=0.01)
