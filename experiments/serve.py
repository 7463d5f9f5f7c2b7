"""An OpenAI-compatible server for a checkpoint: continuous batching over a paged KV cache.

    python experiments/serve.py --checkpoint=/ckpt/llama3.2-1b --port=8000
    python experiments/serve.py --checkpoint=DIR --slots=32 --quantize=int8 --max_queue=128

    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "llama3.2-1b", "prompt": "The capital of France", "max_tokens": 16}'

--checkpoint is any directory llama_jax.load reads; the tokenizer is the one stored with it
unless --tokenizer names a file or "byte". The model name is the directory's base name unless
--model_name says otherwise. Weights stay in the checkpoint's own dtype unless --dtype is
given, so greedy output equals experiments/decode.py's. SIGTERM (or Ctrl-C) stops taking
connections, lets running requests finish for --shutdown_timeout seconds, cancels the rest
and exits. Binds 127.0.0.1 unless --host says otherwise.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax import checkpoint, cli, decode, io, quantize  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Served model id (default: the "
                                  "checkpoint directory's name).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, 'A tokenizer.model or "byte" (default: the one stored with --checkpoint).')
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Weights and compute (default: the checkpoint's own).")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "plain", "cpu"], "llama_jax.backends.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                              "int8: per-channel int8 weights (llama_jax/quantize.py).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests generating at once.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Token slots per KV cache page.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Context per request (default: the model's).")
_PAGES = flags.DEFINE_integer("pages", None, "KV cache pages (default: every slot at max_len).")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Longest prefill chunk (a power of two).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Waiting requests before answering 429.")
_SHUTDOWN = flags.DEFINE_float("shutdown_timeout", 30.0,
                               "Seconds running requests get to finish after SIGTERM.")


def load_tokenizer():
    """--tokenizer, else the checkpoint's own (None if it has none)."""
    return checkpoint.load_tokenizer(_CHECKPOINT.value, _TOKENIZER.value)


def load_weights(directory: str):
    dtype = _DTYPE.value
    if checkpoint.is_params_checkpoint(directory):
        model = checkpoint.load_params(directory, dtype=dtype)
    else:
        model = llama_jax.load(directory, **({} if dtype is None else
                                             dict(dtype=dtype, param_dtype=dtype)))
    model = llama_jax.with_backend(model, llama_jax.backends.get(_BACKEND.value))
    if _QUANTIZE.value == "int8":
        return quantize.int8(decode.prepare(model, kernel=False))
    return decode.prepare(model)


def main(argv):
    del argv
    import uvicorn  # noqa: PLC0415 (the serve extra; imported once the flags are known good)

    from llama_jax.serve import Engine, api  # noqa: PLC0415

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    io.detect_format(_CHECKPOINT.value)
    tok = load_tokenizer()
    weights = load_weights(_CHECKPOINT.value)
    if tok is not None:
        decode.check_vocab(tok.vocab_size, weights.config)
    engine = Engine(weights, tok, slots=_SLOTS.value, page_size=_PAGE_SIZE.value,
                    max_len=_MAX_LEN.value, n_pages=_PAGES.value, chunk=_CHUNK.value,
                    max_queue=_MAX_QUEUE.value)
    engine.warmup()
    name = _MODEL_NAME.value or os.path.basename(os.path.abspath(_CHECKPOINT.value))
    app = api.create_app(engine, tok, name)
    config = uvicorn.Config(app, host=_HOST.value, port=_PORT.value, log_level="warning",
                            timeout_graceful_shutdown=max(1, int(_SHUTDOWN.value)))
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM and SIGINT itself: stop accepting, drain, then the app's
    # lifespan closes the engine.
    print(f"serving {name} on http://{_HOST.value}:{_PORT.value}", flush=True)
    server.run()


if __name__ == "__main__":
    cli.run(main)
