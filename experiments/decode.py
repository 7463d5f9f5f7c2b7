"""Text generation from a checkpoint: parses flags and calls llama_jax.decode.generate.

    python experiments/decode.py --checkpoint=/ckpt/llama3.2-1b --prompt="The capital of France"
    python experiments/decode.py --checkpoint=DIR --prompt_file=prompts.txt --temperature=0.7 \
        --top_p=0.9 --format=json          # one prompt per line, decoded as one batch
    python experiments/decode.py --checkpoint=DIR --prompt_ids=1,306,4658 --max_new_tokens=32
    python experiments/decode.py --checkpoint=DIR --chat --prompt="Write a haiku about JAX."

--checkpoint is any directory llama_jax.load reads (Hugging Face, Meta, a params-only export);
the tokenizer is the one stored with it (DIR/tokenizer.model, for a Meta directory also one
level up as Llama 2 ships it, or the byte tokenizer a byte-level run's export records) unless
--tokenizer names a file or "byte". A single text prompt is streamed to stdout as tokens
arrive; a batch is printed when it finishes. --format=json prints
one object per prompt: {"prompt": i, "ids": [...], "text": "...", "logprobs": [...]} (ids and
logprobs of the generated tokens, a final stop token included; logprobs under the model at
temperature 1).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax import checkpoint, cli, decode, io, quantize  # noqa: E402
from llama_jax.sampling import SamplingParams  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "One text prompt.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Text prompts, one per line (a batch).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "One prompt as token ids: 1,2,3.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, 'A tokenizer.model or "byte" (default: the one stored with --checkpoint).')
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1: all.")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p × the top probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn in the chat format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "plain", "cpu"],
                             "llama_jax.backends: auto = the cpu backend's decode kernels on a "
                             "CPU, the plain math elsewhere.")
_DECODE_ATTENTION = flags.DEFINE_enum(
    "decode_attention", "auto", ["auto", "plain", "ragged_tpu", "ragged_gpu"],
    "Attention over the KV cache: auto is the Pallas kernel on a TPU/GPU, plain elsewhere.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                              "int8: per-channel int8 weights (llama_jax/quantize.py).")
flags.mark_flags_as_mutual_exclusive(["prompt", "prompt_file", "prompt_ids"], required=True)


def load_tokenizer():
    """--tokenizer, else the checkpoint's own (None if it has none)."""
    return checkpoint.load_tokenizer(_CHECKPOINT.value, _TOKENIZER.value)


def load_model(directory: str):
    if checkpoint.is_params_checkpoint(directory):
        model = checkpoint.load_params(directory, dtype=_DTYPE.value)
    else:
        model = llama_jax.load(directory, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    return llama_jax.with_backend(model, llama_jax.backends.get(
        _BACKEND.value, decode_attention=_DECODE_ATTENTION.value))


def read_prompts(tok):
    """Token id lists from the prompt flags; ValueError (one sentence) when unusable."""
    if _PROMPT_IDS.value is not None:
        if _CHAT.value:
            raise ValueError("--chat needs a text prompt; --prompt_ids are used as given.")
        return [[int(t) for t in _PROMPT_IDS.value]]
    if tok is None:
        raise ValueError(f"{_CHECKPOINT.value} stores no tokenizer; pass --tokenizer=PATH "
                         "(a tokenizer.model) or --tokenizer=byte, or use --prompt_ids.")
    if _PROMPT.value is not None:
        texts = [_PROMPT.value]
    elif not os.path.isfile(_PROMPT_FILE.value):
        raise FileNotFoundError(f"--prompt_file={_PROMPT_FILE.value} does not exist.")
    else:
        with open(_PROMPT_FILE.value) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("The prompt is empty; give some text with --prompt or --prompt_file.")
    if _CHAT.value:
        return [tok.encode_dialog([{"role": "user", "content": t}]) for t in texts]
    return [tok.encode(t, bos=True, eos=False) for t in texts]


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it reads at INFO
        logging.set_verbosity(logging.WARNING)
    sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
    sampling.validate(sys.maxsize)  # ranges now; top_k against the vocabulary in generate
    io.detect_format(_CHECKPOINT.value)  # a missing or unreadable directory: one sentence now
    tok = load_tokenizer()
    prompts = read_prompts(tok)
    model = load_model(_CHECKPOINT.value)
    if tok is not None:
        decode.check_vocab(tok.vocab_size, model.config)
    stop_ids = list(tok.stop_ids) if tok is not None else [model.config.eos_id]
    stream = None
    if _FORMAT.value == "text" and len(prompts) == 1 and tok is not None:
        stream = decode.TextStream(tok, stop_ids)
    if _QUANTIZE.value == "int8":
        model = quantize.int8(decode.prepare(model, kernel=False))
    out = decode.generate(model, prompts, _MAX_NEW.value, sampling, seed=_SEED.value,
                          stop_ids=stop_ids, stream=stream)
    for i in range(len(prompts)):
        ids = out.ids(i)
        text = tok.decode([t for t in ids if t not in stop_ids]) if tok is not None else ""
        if _FORMAT.value == "json":
            logprobs = [round(float(x), 6) for x in out.logprobs[i, :len(ids)]]
            print(json.dumps({"prompt": i, "ids": ids, "text": text, "logprobs": logprobs}))
        elif stream is not None:
            print()
        else:
            print(f"--- prompt {i}\n{text if tok is not None else ids}")


if __name__ == "__main__":
    cli.run(main)
