"""Two local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train like one."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import sharding
from mesh_setup import make_step, rel, run_sharded
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multihost"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    with open(os.path.join(out, "losses.json")) as f:
        return json.load(f), os.path.join(out, "state")


@pytest.mark.slow
def test_two_processes_train_like_one(two_processes):
    losses, _ = two_processes
    one_losses, _, _ = run_sharded(sharding.MeshConfig(2, 1, 2, 2))
    assert len(losses) == 3
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_restores_on_a_one_process_mesh_of_another_shape(two_processes):
    _, path = two_processes
    _, params_after, _ = run_sharded(sharding.MeshConfig(2, 1, 2, 2))
    _, host_state, params = make_step()
    mc = sharding.MeshConfig(1, 2, 1, 4)
    mesh = sharding.make_mesh(mc)
    target = sharding.abstract_state(host_state, params, mesh)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path, target)
    assert int(state.step) == 3
    wq = state.params["layers"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("pipeline", None, "tensor", None)
    assert rel(state.params, params_after[-1]) <= 1e-6


def test_missing_process_ends_the_wait_with_one_sentence():
    """Process 0 of 2 alone, and process 1 of 2 without a coordinator: each says whom it waits
    for, and after the timeout names what did not arrive (JAX itself would abort after five
    minutes saying "another task died")."""
    port = _free_port()
    code = ("import sys; from llama_jax import sharding; "
            "sharding.initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=2)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"127.0.0.1:{p}", str(i)], env=env,
                              cwd=os.path.dirname(os.path.dirname(WORKER)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, p in ((0, port), (1, _free_port()))]
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (err0, err1)
    assert err0.splitlines() == [
        f"Process 0 of 2: waiting up to 2 s for process 1 to connect at 127.0.0.1:{port}.",
        f"error: process 0 of 2 waited 2 s at 127.0.0.1:{port}, but process 1 never connected; "
        "start every process with the same --coordinator_address and --num_processes and its "
        "own --process_id, or raise --distributed_timeout."]
    lines = err1.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Process 1 of 2: waiting up to 2 s for the "
                                                   "coordinator (process 0) at 127.0.0.1:")
    assert lines[1].startswith("error: process 1 of 2 waited 2 s for the coordinator at ")
    assert "which is not listening; start process 0 there" in lines[1]
