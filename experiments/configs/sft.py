"""Supervised fine-tuning on conversations (Llama 3 paper §4.1.3): the loss is the mean cross-entropy
over the assistant turns' content and end-of-turn tokens.

    python experiments/train.py --config=experiments/configs/sft.py --workdir=/tmp/sft \
        --config.train.init_from=CHECKPOINT_DIR --config.data.files='data/*.jsonl'

The architecture and tokenizer are the checkpoint's (HF, Meta or a llama_jax export); the data
format is in the README (Post-training). `sft.py:test` is the seconds-long variant the tests
train.
"""

from llama_jax import experiment


def get_config(arg: str = ""):
    c = experiment.post_training("sft")
    if arg == "test":
        experiment.post_training_test(c)
    elif arg:
        raise ValueError(f"Unknown sft.py argument {arg!r}; use sft.py or sft.py:test.")
    c.lock()
    return c
