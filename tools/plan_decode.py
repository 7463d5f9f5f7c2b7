"""What one decode step costs on a target, from its compiled program (llama_jax/decode_plan.py).

    python tools/plan_decode.py --model=llama3.2-1b --target=v5e:2x2 --batch=1 \
        --cache=2048,8192 --decode_attention=plain,ragged_tpu
    python tools/plan_decode.py --model=tiny --target=cpu --decode_attention=plain
    python tools/plan_decode.py --model=llama3.1-8b --target=v5p:2x2x1 --tensor=4 --cache=8192

One JSON line per (cache length, decode attention): bytes/step (XLA's cost analysis) against
the roofline bytes (weights + the K/V cache read once), kernels per step by opcode, cache
copies and collectives (per device on a --data x --tensor mesh of the target's devices, the
weights and cache placed as decode.generate places them), and on a TPU target the predicted
tokens/s at its HBM bandwidth (hardware.py). --loop also compiles decode.loop (generate's
loop) and counts its cache copies per token and per call. TPU targets need libtpu
(pip install -e ".[plan]"); nothing runs on a local accelerator.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # plans never run on the local accelerator
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's init on a non-TPU VM

from llama_jax import cli  # noqa: E402


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3.2-1b", help="a config preset")
    parser.add_argument("--target", default="v5e:2x2", help="a TPU topology (v5e:2x2) or cpu")
    parser.add_argument("--dtype", default="bfloat16", help="weights, compute and cache dtype")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", default="2048,8192", help="cache lengths, comma-separated")
    parser.add_argument("--data", type=int, default=1, help="rows split over this many devices")
    parser.add_argument("--tensor", type=int, default=1,
                        help="heads, mlp and vocab split over this many devices")
    parser.add_argument("--loop", action="store_true",
                        help="also compile decode.loop (generate's loop): cache copies per "
                             "step inside it and once outside it")
    parser.add_argument("--decode_attention", default="plain,ragged_tpu",
                        help="plain, ragged_tpu, ragged_gpu; comma-separated")
    args = parser.parse_args(argv)
    import llama_jax as lj  # noqa: PLC0415
    from llama_jax import decode_plan  # noqa: PLC0415
    try:
        lengths = [int(x) for x in args.cache.split(",")]
        config = lj.get_config(args.model, dtype=args.dtype, param_dtype=args.dtype,
                               max_seq_len=max(lengths))
        for length in lengths:
            for name in args.decode_attention.split(","):
                print(json.dumps(decode_plan.plan_decode(config, args.target, args.batch,
                                                         length, name, args.data,
                                                         args.tensor, args.loop)), flush=True)
    except (ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli.call(main))
