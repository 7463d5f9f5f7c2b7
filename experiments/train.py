"""Pretraining launcher: parses flags and calls llama_jax.train.run.

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny
    python experiments/train.py --config=experiments/configs/llama3_8b.py \
        --workdir=/mnt/bucket/run --config.data.tokenizer=/path/tokenizer.model \
        --config.data.files='/data/*.jsonl' --config.optim.peak_lr=2e-4 --config.train.steps=1000

Rerunning the same command resumes from the latest checkpoint in --workdir. Multi-host: run the
same command on every host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables);
on TPU VMs --distributed finds them itself. A process waits --distributed_timeout seconds for
the others, then names what did not arrive and exits with code 2.
"""

import os
import sys

# Inside a checkout the launcher runs that checkout's llama_jax (`python experiments/train.py`
# puts only experiments/ on the path); a copy of this file elsewhere runs the installed package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "llama_jax", "__init__.py")):
    sys.path.insert(0, _ROOT)

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llama_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Let JAX detect the cluster (TPU VMs).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", None, "Seconds to wait for every process to connect (default: "
    "$LLAMA_JAX_DISTRIBUTED_TIMEOUT or 300).", lower_bound=1)
_RETAIN_MEMORY = flags.DEFINE_bool(
    "retain_host_memory", True, "Keep freed host memory for reuse (the cpu backend's "
    "host_memory): on CPU each step otherwise faults its temporaries in afresh. Hosts with TPU "
    "or GPU device files and the plain backend skip it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Imported here, after the flags and the config have parsed: a mistake in them is reported
    # in a second or two, without loading the checkpoint, data and training stacks.
    from llama_jax import backends, sharding, train  # noqa: PLC0415

    if _RETAIN_MEMORY.value:  # before JAX starts its threads
        backends.prepare_host(_CONFIG.value.mesh.backend)
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        auto=_DISTRIBUTED.value,  # before anything touches a device
                        timeout_s=_DISTRIBUTED_TIMEOUT.value)
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
