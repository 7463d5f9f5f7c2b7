"""lm-evaluation-harness's command line with the `llama_jax` backend registered.

    python tools/lm_eval.py --model llama_jax --model_args checkpoint=DIR,dtype=bfloat16 \\
        --tasks arc_easy,hellaswag --batch_size 8 --output_path results --log_samples
    python tools/lm_eval.py --model llama_jax --model_args checkpoint=DIR \\
        --include_path my_tasks --tasks my_task     # local task YAMLs over local data files

Every option is lm_eval's own (`lm_eval --help`); model_args are those of
llama_jax.lm_eval_model.LlamaJaxLM (checkpoint, dtype, batch_size, max_length, tensor,
tokenizer). Nothing is downloaded by this tool: tasks whose YAML names a Hugging Face dataset
fetch it through lm_eval's `datasets` as usual, local ones (`dataset_path: json` with
`data_files`) read files. A task name lm_eval does not know ends in one line naming the places
it looked.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this repository's llama_jax (beside tools/) comes before an installed one,
# and tools/ itself leaves the path: its lm_eval.py (this file) would hide the lm_eval package.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]
sys.path.insert(0, os.path.dirname(_TOOLS))
from llama_jax import cli  # noqa: E402


def main(argv: list[str]) -> None:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from llama_jax import lm_eval_model  # noqa: F401  registers --model llama_jax

    setup_logging()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    try:
        parser.execute(args)
    except ValueError as e:
        if not str(e).startswith("Tasks not found"):
            raise
        raise ValueError(f"{e}; looked in lm_eval's tasks ({_builtin_tasks()})"
                         + (f" and --include_path {args.include_path}"
                            if getattr(args, "include_path", None) else
                            " only; pass --include_path DIR for task YAMLs of your own")
                         + "; list the known names with `lm_eval ls tasks`.") from None


def _builtin_tasks() -> str:
    import lm_eval.tasks
    return os.path.dirname(lm_eval.tasks.__file__)


if __name__ == "__main__":
    sys.exit(cli.call(main, sys.argv[1:]))
