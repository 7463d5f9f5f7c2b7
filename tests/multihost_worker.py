"""One process of the two-process test (tests/test_multihost.py): 4 CPU devices each.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Trains the tiny test model for 3 steps on the (data 2, context 2, tensor 2) mesh over both
processes' 8 devices, each process feeding only its own rows of every batch; writes the state
collectively with Orbax to OUT_DIR/state and the losses to OUT_DIR/losses.json (process 0).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before JAX starts
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)  # as the tests in this process

from llama_jax import sharding  # noqa: E402

MESH = sharding.MeshConfig(data=2, pipeline=1, context=2, tensor=2)


def main(process_id: int, num_processes: int, port: int, out: str):
    sharding.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import orbax.checkpoint as ocp
    from mesh_setup import batches, make_step, step_fn

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    s, host_state, params = make_step()
    mesh = sharding.make_mesh(MESH)
    state = sharding.put_state(host_state, sharding.state_shardings(host_state, params, mesh))
    step = sharding.jit_step(step_fn(s, mesh, MESH), mesh, MESH, state, params)
    mine = sharding.process_rows(mesh, batches(1)[0]["inputs"].shape[0])
    assert mine.stop - mine.start == 8  # half of the 16 rows
    losses = []
    with jax.set_mesh(mesh):
        for b in batches(3):
            local = {k: v[mine] for k, v in b.items()}
            state, metrics = step(state, sharding.shard_batch(local, mesh))
            losses.append(float(metrics["loss"].addressable_data(0)))
    with ocp.StandardCheckpointer() as ckptr:  # collective: every process writes its shards
        ckptr.save(os.path.join(out, "state"), state)
        ckptr.wait_until_finished()
    if process_id == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(losses, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
