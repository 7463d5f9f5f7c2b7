"""Averages checkpoints of one architecture, tensor by tensor (Llama 3 paper §4.1.5: the models
of each post-training round, from runs over other data or hyperparameters, are averaged).

    python tools/average_checkpoints.py --input=run_a/export --input=run_b/export \
        --output=averaged [--weights=0.7,0.3] [--to=hf|orbax|meta] [--dtype=bf16|f32]

Each output tensor is Σ w_i · tensor_i / Σ w_i over the inputs (equal weights by default),
computed in float32 and written in the first input's dtype unless --dtype says otherwise. The
inputs may mix formats (Hugging Face, Meta, llama_jax params exports); each is read as the
converter reads it (tools/convert_checkpoint.py), one tensor at a time, so memory stays near
one tensor per input. The output (default: the first input's format) is written like a
conversion: into a temporary sibling renamed into place when complete, with the first input's
tokenizer and generation files. Inputs of different architectures are refused in one sentence
naming the field before anything is written. Reward model exports (experiments/configs/
reward.py) are averaged leaf by leaf into a reward export.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

# Run as a script, this repository's llama_jax and tools (beside this folder) come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import checkpoint, cli, io, orbax_stream, reward  # noqa: E402
from llama_jax.tokenizer import BYTE  # noqa: E402
from tools import convert_checkpoint as convert  # noqa: E402


class Average:
    """The weighted mean of several sources, itself a source (the converter's interface:
    config, names, shape, dtype, get, where, carried)."""

    def __init__(self, sources: list, weights: list[float], paths: list[str]):
        self.sources, self.paths = sources, paths
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.config, self.carried = sources[0].config, sources[0].carried
        check_architectures([s.config for s in sources], paths)

    names = property(lambda self: self.sources[0].names)

    def shape(self, name):
        return self.sources[0].shape(name)

    def dtype(self, name):
        return self.sources[0].dtype(name)

    def where(self, name):
        return " + ".join(s.where(name) for s in self.sources)

    def get(self, name) -> np.ndarray:
        total = np.zeros(self.shape(name), np.float32)
        for source, w in zip(self.sources, self.weights):
            total += np.float32(w) * np.asarray(source.get(name), np.float32)
        return total.astype(self.dtype(name))


def check_architectures(configs: list, paths: list[str]) -> None:
    """One sentence naming the fields in which an input's architecture differs from the first's."""
    for path, config in zip(paths[1:], configs[1:]):
        theirs, ours = config.arch(), configs[0].arch()
        diff = [f"{k} {theirs[k]} != {ours[k]}" for k in ours if theirs[k] != ours[k]]
        if diff:
            raise ValueError(f"--input {path} holds another architecture than {paths[0]} "
                             f"({'; '.join(diff)}); average checkpoints of one model.")


def average_rewards(inputs: list[str], output: str, weights: list[float], *,
                    dtype: str | None = None, overwrite: bool = False) -> str:
    """Reward model exports (Llama 3 averages its reward models too): their Orbax parameter
    trees leaf by leaf (layer by layer for stacked leaves), written as a reward export."""
    readers = [orbax_stream.Reader(os.path.join(p, checkpoint.PARAMS_DIR)) for p in inputs]
    configs = [checkpoint.load_config(p) for p in inputs]
    check_architectures(configs, inputs)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def mean(leaf, layer=None):
        total = sum(np.float32(wi) * np.asarray(r.get(leaf, layer), np.float32)
                    for r, wi in zip(readers, w))
        return total.astype(convert.DTYPES.get(dtype) or readers[0].dtype(leaf))

    def write(path):
        with orbax_stream.Writer(path) as out:
            for leaf in readers[0].paths:
                shape, stacked = readers[0].shape(leaf), leaf[0] == "layers"
                dt = convert.DTYPES.get(dtype) or readers[0].dtype(leaf)
                writer = out.leaf(leaf, shape, dt, device, stacked=stacked)
                for layer in (range(shape[0]) if stacked else [None]):
                    writer.write(mean(leaf, layer), layer)

    config = configs[0]
    if dtype:
        name = convert._DTYPE_NAMES[convert.DTYPES[dtype]]
        config = config.replace(param_dtype=name, dtype=name)
    tokenizer = checkpoint.tokenizer_spec(inputs[0])
    return checkpoint.write_export(
        output, config, write, files=checkpoint.carried_files(inputs[0]), overwrite=overwrite,
        tokenizer=BYTE if tokenizer == BYTE else None, extra={"kind": reward.KIND})


def parse_weights(spec: str | None, n: int) -> list[float]:
    if not spec:
        return [1.0] * n
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"--weights={spec!r} is not a comma-separated list of numbers.") from None
    if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--weights={spec!r} needs {n} non-negative numbers (one per --input) "
                         f"with a positive sum.")
    return weights


def average(inputs: list[str], output: str, *, weights: str | None = None, to: str | None = None,
            dtype: str | None = None, overwrite: bool = False) -> str:
    """Writes the (weighted) mean of the checkpoint directories `inputs` to `output`."""
    if len(inputs) < 2:
        raise ValueError(f"got {len(inputs)} --input; give two or more checkpoints to average.")
    for path in inputs:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--input {path} is not a directory.")
    rewards = [reward.is_reward_checkpoint(p) for p in inputs]
    if any(rewards) and not all(rewards):
        raise ValueError(f"--input {inputs[rewards.index(not rewards[0])]} and {inputs[0]} are "
                         f"not both reward models; average reward models with reward models.")
    to = to or io.detect_format(inputs[0])
    if rewards[0] and to != "orbax":
        raise ValueError(f"reward models are averaged into a reward export; drop --to={to}.")
    convert.check_output(output, to=to, dtype=dtype, overwrite=overwrite)
    w = parse_weights(weights, len(inputs))
    if rewards[0]:
        return average_rewards(inputs, output, w, dtype=dtype, overwrite=overwrite)
    source = Average([convert.open_source(p) for p in inputs], w, inputs)
    return convert.write(source, output, to=to, dtype=dtype,
                         byte=checkpoint.tokenizer_spec(inputs[0]) == BYTE, overwrite=overwrite)


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True,
                   help="a checkpoint directory (repeat: two or more)")
    p.add_argument("--output", required=True, help="directory to write (must not hold files)")
    p.add_argument("--weights", help="comma-separated, one per --input (default: equal)")
    p.add_argument("--to", choices=convert.FORMATS, help="output format (default: the first "
                   "input's)")
    p.add_argument("--dtype", choices=tuple(convert.DTYPES), help="output dtype (default: the "
                   "first input's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    a = p.parse_args(argv)
    path = cli.call(lambda: average(a.input, a.output, weights=a.weights, to=a.to, dtype=a.dtype,
                                    overwrite=a.overwrite), unwind_on_sigterm=True)
    print(f"Averaged {len(a.input)} checkpoints into {path}.")


if __name__ == "__main__":
    main()
