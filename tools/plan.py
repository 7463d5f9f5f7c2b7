"""Plan a training run for a target machine before booking it (ahead-of-time compile).

    python tools/plan.py --config=experiments/configs/llama3_8b.py --target=v5p:4x4x4
    python tools/plan.py --config=experiments/configs/plan_llama3_405b_paper.py --target=h100:8192
    python tools/plan.py --config=experiments/configs/llama3_70b.py --target=v5e:16x16 \
        --config.mesh.tensor=8 --config.model.remat=full --format=json
    python tools/plan.py --config=experiments/configs/llama3_8b.py --target=h100:64 --search

Targets: TPU topologies (v4/v5e/v5p/v6e, e.g. v5p:4x4x4, several slices as 2xv5e:16x16; needs
the libtpu wheel: pip install -e ".[plan]"), GPU nodes of 8 H100/H200 (h100:N, compiled for
simulated CPU devices and labelled an estimate), cpu:N. Prints per-device memory against the
device's, FLOPs (compiler vs analytic), and the roofline step time and MFU.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # plans never run on the local accelerator
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's init on a non-TPU VM

from llama_jax import cli, plan, plan_search  # noqa: E402


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment config file[:arg]")
    parser.add_argument("--target", required=True, help="e.g. v5p:4x4x4, h100:64, cpu:8")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--search", action="store_true",
                        help="search remat, accumulation steps and mesh factorisations")
    parser.add_argument("--max_compiles", type=int, default=8, help="layouts --search compiles")
    parser.add_argument("--max_devices", type=int, default=0,
                        help="simulated CPU devices for a GPU target (default 2048); above it "
                             "the data axis shrinks, and FSDP-sharded temporaries with it grow")
    args, overrides = parser.parse_known_args(argv)
    if args.max_devices:  # here, and through the environment in the planning subprocess
        plan.MAX_SIMULATED = args.max_devices
        os.environ["LLAMA_JAX_PLAN_MAX_DEVICES"] = str(args.max_devices)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; config overrides look like --config.mesh.tensor=8")
    if not os.path.isfile(args.config.partition(":")[0]):
        parser.error(f"--config: the config file {args.config.partition(':')[0]} does not exist")
    try:
        config = plan.load_config(args.config, overrides)
        results = (plan_search.search(config, args.target, args.max_compiles) if args.search
                   else [plan.plan(config, args.target)])
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(results if args.search else results[0], indent=1, default=float))
    else:
        if args.search:
            print(plan_search.format_ranking(results) + "\n")
        print("\n\n".join(plan_search.format_report(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(cli.call(main))
