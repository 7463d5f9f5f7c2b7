"""Host memory for training on CPU: freed memory is kept for reuse, not handed back to the OS.

    from llama_jax import host_memory
    host_memory.retain_freed_memory()   # first thing in the process, before JAX runs anything

Why. XLA:CPU allocates all of a step's temporaries as one block (1.77 GB for the bench shape's
bf16 train step) from one of its worker threads. glibc serves a block that large from a fresh
mmap and unmaps it when it is freed, so every step faults the whole block in again, one 4 KiB
page at a time, with the kernel zeroing each: measured ~497,000 minor faults and ~0.9 s of
system time per bench step (2.5 s of user time), and 10.4 M faults and 18 s of system time in
the first 60 steps of experiments/configs/tiny.py (the ~95 s of system time of its full run).

How. One malloc arena for all threads (a worker thread's own arena would still mmap a block
larger than its 64 MiB heap), no mmap for large blocks, no trimming of the heap's top: the
block freed at the end of a step is the one the next step gets. Measured: no faults in steady
state; the tiny run's first 60 steps 76 s -> 62 s wall, 17.9 s -> 2.3 s system time, the same
losses. Cost: the process keeps its peak memory, and the one heap fragments (peak RSS 1.6 ->
3.6 GB for the tiny run, 2.8 -> 6.1 GB for the bench step), so it is for training processes,
not for libraries or tests. glibc's malloc only (mallopt); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import glob

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt parameters, glibc malloc.h


def has_accelerator() -> bool:
    """Whether this host has TPU or NVIDIA GPU device files: there XLA's step temporaries live
    in device memory, and keeping host memory would only hold checkpoint and input buffers.
    A file check, so it runs before JAX starts any backend."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or glob.glob("/dev/nvidia[0-9]*"))


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep and reuse freed memory. Call it before JAX starts its CPU
    backend: threads that have already allocated keep their own arenas. Returns False, having
    changed nothing, where the C library is not glibc."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
    return all(libc.mallopt(key, value) == 1 for key, value in settings)
