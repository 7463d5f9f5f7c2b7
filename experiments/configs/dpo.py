"""DPO with Llama 3's two changes (paper §4.1.4): formatting tokens masked out of the sequence
log-probs, and an NLL term (dpo.nll_coef 0.2) on the chosen responses; β dpo.beta 0.1. The
reference is dpo.reference, by default the init_from weights, frozen.

    python experiments/train.py --config=experiments/configs/dpo.py --workdir=/tmp/dpo \
        --config.train.init_from=CHECKPOINT_DIR --config.data.files='data/*.jsonl'

The architecture and tokenizer are the checkpoint's (HF, Meta or a llama_jax export); the data
format is in the README (Post-training). `dpo.py:test` is the seconds-long variant the tests
train.
"""

from llama_jax import experiment


def get_config(arg: str = ""):
    c = experiment.post_training("dpo")
    if arg == "test":
        experiment.post_training_test(c)
    elif arg:
        raise ValueError(f"Unknown dpo.py argument {arg!r}; use dpo.py or dpo.py:test.")
    c.lock()
    return c
