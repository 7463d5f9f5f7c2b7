"""Small post-training cases shared by test_lora and test_post_training_round: a Hugging Face
base checkpoint with a 512-piece SentencePiece tokenizer (Llama 2's chat format, trained in
well under a second on this package's source), and JSONL conversations, preference pairs and
prompts. A 512-token vocabulary keeps each run's step a few milliseconds on CPU."""

import json
import os

import numpy as np

import llama_jax
from llama_jax import experiment, hf, tokenizer_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = llama_jax.get_config("tiny", vocab_size=512, dim=32, n_layers=2, n_heads=2,
                              n_kv_heads=1, ffn_dim=64, max_seq_len=128, scan_layers=False)


def base_checkpoint(directory: str, seed: int = 1) -> str:
    """A random-init HF checkpoint of CONFIG with its tokenizer.model beside the weights."""
    hf.save_hf(llama_jax.create(CONFIG, seed=seed), directory)
    tokenizer_training.train(os.path.join(directory, "tokenizer"), vocab_size=CONFIG.vocab_size,
                             files=os.path.join(ROOT, "llama_jax", "c*.py"))
    return directory


def sft_file(path, n: int = 12) -> str:
    rng = np.random.default_rng(2)
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user", "content": f"question {i}"},
                     {"role": "assistant", "content": f"answer {rng.integers(99)} for {i}"}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def pairs_file(path, n: int = 8) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"item {i}?"}],
                                "chosen": [{"role": "assistant", "content": "yes " * (1 + i % 3)}],
                                "rejected": [{"role": "assistant", "content": "no " * (1 + i % 2)}]
                                }) + "\n")
    return str(path)


def prompts_file(path, n: int = 4) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"item {i}?"}]}) + "\n")
    return str(path)


def config(name: str, tmp, **overrides):
    """experiments/configs/<name>.py:test with 8 rows (one per simulated device), its corpus
    under tmp, and `section.field=value` overrides."""
    c = experiment.load(os.path.join(ROOT, "experiments", "configs", f"{name}.py:test"))
    c.data.data_dir, c.data.global_batch = str(tmp / "tfds"), 8
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(c[section], field, value)
    return c


def metrics(workdir) -> list[dict]:
    """The logged training steps of a run (eval lines left out)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]
