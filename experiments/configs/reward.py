"""A reward model (paper §4.1.2): the LLaMA trunk with a scalar head on the last token, trained with
the Bradley-Terry loss on preference pairs; exported with config.json "kind": "reward"
(llama_jax.reward.load, reward.score).

    python experiments/train.py --config=experiments/configs/reward.py --workdir=/tmp/reward \
        --config.train.init_from=CHECKPOINT_DIR --config.data.files='data/*.jsonl'

The architecture and tokenizer are the checkpoint's (HF, Meta or a llama_jax export); the data
format is in the README (Post-training). `reward.py:test` is the seconds-long variant the tests
train.
"""

from llama_jax import experiment


def get_config(arg: str = ""):
    c = experiment.post_training("reward")
    if arg == "test":
        experiment.post_training_test(c)
    elif arg:
        raise ValueError(f"Unknown reward.py argument {arg!r}; use reward.py or reward.py:test.")
    c.lock()
    return c
