"""LLaMA 13B pretraining (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models", Table 2 and §2.3): peak lr 3e-4, batch 4M tokens (2,048 sequences × 2,048), 2,000 warmup
steps, cosine to 10% of the peak, 1.0T tokens; AdamW β 0.9/0.95, weight decay 0.1, clip 1.0.

    python experiments/train.py --config=experiments/configs/llama1_13b.py --workdir=DIR \
        --config.data.tokenizer=/path/llama/tokenizer.model --config.data.files='/data/*.jsonl'
"""

from llama_jax import experiment


def get_config(arg: str = ""):
    del arg
    # 1.0e12 tokens / (2,048 × 2,048 = 4,194,304 tokens per step) = the number of steps.
    return experiment.paper_recipe(
        "llama1-13b", peak_lr=3e-4, batch_tokens=2048 * 2048, seq_len=2048, warmup_steps=2000,
        train_tokens=1.0e12)
