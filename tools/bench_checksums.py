"""Cost of the checkpoint checksums (llama_jax.checksums) at the bench shape, as JSON lines.

    python tools/bench_checksums.py                      # bf16 compute, f32 state
    python tools/bench_checksums.py --dtype=float32 --rounds=5

1. `hash`: crc32 / adler32 / blake2b / sha256 over 256 MiB in memory, one core.
2. `checkpoint`: the bench-shape TrainState (f32 parameters + AdamW moments) saved by
   train_checkpoint.Manager, then `checksums.write` over its files, timed alone (the files are in
   the page cache, as when Orbax's callback runs right after writing them).
3. `train`: the bench train step (tools/benchmark.py's, batch 4 x 512) alone and while a thread
   re-hashes the step's files in a loop (every step overlapped: the worst case), interleaved in
   rounds. The checksum of one save costs about (overlapped - alone) x (hash seconds /
   step seconds); at checkpoint_every K that is spread over K steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the train step.")
flags.DEFINE_integer("steps", 6, "Timed steps per block.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds of (alone, overlapped) blocks.")
FLAGS = flags.FLAGS


def _print(row):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)


def bench_hashes():
    buf = os.urandom(256 << 20)
    for name, fn in [("crc32", zlib.crc32), ("adler32", zlib.adler32),
                     ("blake2b", lambda b: hashlib.blake2b(b).digest()),
                     ("sha256", lambda b: hashlib.sha256(b).digest())]:
        t = time.perf_counter()
        fn(buf)
        seconds = time.perf_counter() - t
        _print(dict(bench="hash", algorithm=name, gb_per_s=len(buf) / seconds / 1e9))


def main(argv):
    del argv
    from llama_jax import backends
    backends.prepare_host("auto")  # before JAX starts its threads, as the launcher does
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    import grain
    import jax
    import numpy as np

    import llama_jax as lj
    from llama_jax import backends, checksums, train, train_checkpoint
    from tools import bench_setup
    bench_hashes()
    c = lj.get_config("bench", dtype=FLAGS.dtype)
    step_fn, state, batch = bench_setup.train_setup(c, backends.get("auto"), 4, 512)
    state = {"s": state}  # as tools/benchmark.py train

    def steps(n):
        t0 = time.perf_counter()
        for _ in range(n):
            state["s"], _ = train.train_step(state["s"], batch, step_fn)
            jax.block_until_ready(state["s"])
        return (time.perf_counter() - t0) / n

    steps(2)  # compile, warm up
    with tempfile.TemporaryDirectory() as workdir:
        mgr = train_checkpoint.Manager(workdir, c, save_every=1, keep=1, run_config={})
        mgr.save(1, state["s"], iter(grain.MapDataset.range(4).to_iter_dataset()))
        mgr.close()
        step_dir = os.path.join(workdir, "checkpoints", "1")
        size = sum(n for n, _ in checksums.read(step_dir)["files"].values())
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            checksums.write(step_dir, train_checkpoint.ITEMS)
            times.append(time.perf_counter() - t0)
        hash_s = sorted(times)[1]
        _print(dict(bench="checkpoint", state_bytes=size, checksum_s=hash_s,
                    gb_per_s=size / hash_s / 1e9))

        stop, hashes = threading.Event(), []

        def hash_loop():
            while not stop.is_set():
                t0 = time.perf_counter()
                checksums.write(step_dir, train_checkpoint.ITEMS)
                hashes.append(time.perf_counter() - t0)
        alone, overlapped = [], []
        for _ in range(FLAGS.rounds):
            alone.append(steps(FLAGS.steps))
            stop.clear()
            thread = threading.Thread(target=hash_loop)
            thread.start()
            overlapped.append(steps(FLAGS.steps))
            stop.set()
            thread.join()
    a, o = float(np.median(alone)), float(np.median(overlapped))
    h = float(np.median(hashes))
    per_save = (o - a) * h / o  # extra seconds the steps overlapping one checksum take
    _print(dict(bench="train", dtype=FLAGS.dtype, step_s=a, step_s_while_hashing=o,
                checksum_s_while_training=h, cost_per_save_s=per_save,
                of_step_at_every_10=per_save / (10 * a), of_step_at_every_500=per_save / (500 * a),
                jax=jax.__version__, device=jax.devices()[0].device_kind))


if __name__ == "__main__":
    app.run(main)
