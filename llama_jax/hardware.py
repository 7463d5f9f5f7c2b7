"""Accelerators the planner targets (peaks, memory, links, with sources) and the roofline.

    dev = DEVICES["h100"]                       # one GPU; TPUs are keyed "v4", "v5e", "v5p", "v6e"
    t = roofline(dev, flops=..., hbm_bytes=..., fast_bytes=..., slow_bytes=...)

Every number is per chip and dense bf16. A link bandwidth is one direction of one link; a ring
collective over a torus axis drives two links (both directions), an NVSwitch node gives each GPU
its full NVLink bandwidth, and traffic that leaves a TPU slice or a GPU node runs at the
data-centre network's share per chip (`slow_bw`).

Sources:
  TPU: cloud.google.com/tpu/docs/{v4,v5e,v5p-training,v6e} ("system architecture" tables);
    v4 ICI per link from "How to Scale Your Model" (jax-ml scaling book, part 2, TPU table).
    v5e: ICI 1,600 Gbps per chip over 4 ports; DCN 2 x 100 Gbps NIC per host of 8 chips.
    v5p: ICI 1,200 GBps bidirectional per chip over 6 ports; DCN 50 Gbps per chip.
    v6e: ICI 3,200 Gbps per chip over 4 ports; DCN 4 x 200 Gbps NIC per host of 8 chips.
  GPU: NVIDIA A100 80GB SXM datasheet (312 TFLOP/s dense bf16, 2,039 GB/s; LLaMA 1's cluster);
    NVIDIA H100 / H200 SXM datasheets (989 TFLOP/s dense bf16; 1,979 is with sparsity),
    NVLink 4 at 900 GB/s bidirectional per GPU; DGX H100/H200 nodes of 8 GPUs with one
    400 Gb/s ConnectX-7 InfiniBand port per GPU (the Llama 3 paper's cluster, §3.3.1).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import sys

GB, GiB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One chip: what the roofline and the memory check need."""

    name: str
    platform: str          # "tpu" or "gpu"
    peak_flops: float      # dense bf16 FLOP/s
    hbm_bytes: float       # memory capacity
    hbm_bw: float          # bytes/s
    link_bw: float         # one direction of one ICI / NVLink link, bytes/s
    ring_links: int        # links a ring collective drives per chip (2: both torus directions)
    slow_bw: float         # per chip, across slices (DCN) or nodes (InfiniBand), bytes/s
    domain: str            # what slow_bw crosses: "slice" or "node"
    source: str

    @property
    def fast_bw(self) -> float:
        """Per-chip bandwidth of a collective inside a slice / node."""
        return self.link_bw * self.ring_links


DEVICES: dict[str, Device] = {
    "v4": Device("TPU v4", "tpu", 275e12, 32 * GiB, 1200 * GB, 45 * GB, 2, 6.25 * GB, "slice",
                 "cloud.google.com/tpu/docs/v4; ICI per link: jax-ml scaling book"),
    "v5e": Device("TPU v5e", "tpu", 197e12, 16 * GB, 819 * GB, 50 * GB, 2, 3.125 * GB, "slice",
                  "cloud.google.com/tpu/docs/v5e"),
    "v5p": Device("TPU v5p", "tpu", 459e12, 95 * GiB, 2765 * GB, 100 * GB, 2, 6.25 * GB, "slice",
                  "cloud.google.com/tpu/docs/v5p-training"),
    "v6e": Device("TPU v6e", "tpu", 918e12, 32 * GB, 1640 * GB, 100 * GB, 2, 12.5 * GB, "slice",
                  "cloud.google.com/tpu/docs/v6e"),
    "a100": Device("A100 SXM 80GB", "gpu", 312e12, 80 * GiB, 2039 * GB, 300 * GB, 1, 25 * GB,
                   "node", "NVIDIA A100 datasheet; NVLink 3 600 GB/s bidi; 200 Gb/s IB per GPU"),
    "h100": Device("H100 SXM", "gpu", 989e12, 80 * GiB, 3350 * GB, 450 * GB, 1, 50 * GB, "node",
                   "NVIDIA H100 datasheet; NVLink 4 900 GB/s bidi; 400 Gb/s IB per GPU"),
    "h200": Device("H200 SXM", "gpu", 989e12, 141 * GB, 4800 * GB, 450 * GB, 1, 50 * GB, "node",
                   "NVIDIA H200 datasheet; NVLink 4 900 GB/s bidi; 400 Gb/s IB per GPU"),
}

GPUS_PER_NODE = 8  # DGX / HGX H100 and H200

# device_kind reported by JAX -> DEVICES key (v5e calls itself "TPU v5 lite", v5p "TPU v5").
DEVICE_KINDS = {"A100": "a100", "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
                "TPU v5p": "v5p",
                "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e", "H100": "h100",
                "H200": "h200"}


def peak_tflops_by_kind() -> dict[str, float]:
    """device_kind -> dense bf16 TFLOP/s (the table llama_jax.flops re-exports)."""
    table = {kind: DEVICES[key].peak_flops / 1e12 for kind, key in DEVICE_KINDS.items()}
    return table


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Per-device times (seconds) of one step's three resources and the bound among them."""

    compute_s: float
    hbm_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        """Perfect overlap: the step takes as long as its slowest resource (a lower bound)."""
        return max(self.compute_s, self.hbm_s, self.comm_s)

    @property
    def serial_s(self) -> float:
        """No overlap at all: an upper bound."""
        return self.compute_s + self.hbm_s + self.comm_s

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "hbm": self.hbm_s, "comm": self.comm_s}
        return max(times, key=times.get)


def roofline(dev: Device, *, flops: float, hbm_bytes: float, fast_bytes: float,
             slow_bytes: float, devices_per_chip: int = 1) -> Roofline:
    """Times of one step on one device from its FLOPs, HBM traffic and collective bytes sent
    over fast (ICI / NVLink) and slow (DCN / InfiniBand) links. A chip exposed as several JAX
    devices (TPU v4 without megacore) shares its peaks among them."""
    share = 1.0 / devices_per_chip
    return Roofline(compute_s=flops / (dev.peak_flops * share),
                    hbm_s=hbm_bytes / (dev.hbm_bw * share),
                    comm_s=fast_bytes / (dev.fast_bw * share) + slow_bytes / (dev.slow_bw * share))


# ----------------------------------------------------------------------------------------------
# Targets: "v5p:4x4x4", "2xv5e:16x16" (two slices), "h100:8192" (GPUs, nodes of 8), "cpu:8".

TPU_EXAMPLES = ("v4:2x2x2", "v5e:4x4", "v5e:16x16", "2xv5e:16x16", "v5p:4x4x4", "v5p:16x16x16",
                "v6e:4x4", "v6e:16x16")
LIBTPU_HINT = ('TPU targets compile with the libtpu wheel; install the one matching JAX with '
               'pip install "jax[tpu]==$(python -c \'import jax; print(jax.__version__)\')" '
               '(or pip install -e ".[plan]").')


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: `n_devices` JAX devices of kind `device`."""

    name: str
    device: Device
    n_devices: int
    topology: str = ""     # TPU topology of one slice, e.g. "v5p:4x4x4"
    slices: int = 1
    devices_per_chip: int = 1  # TPU v4 topologies expose each chip as 2 devices (no megacore)

    @property
    def estimate(self) -> bool:
        """GPU plans are compiled by the CPU backend: shapes and collectives are right, XLA's
        GPU fusion and memory layout are not."""
        return self.device.platform == "gpu"


def valid_targets() -> str:
    gpus = ", ".join(f"{k}:N" for k, d in DEVICES.items() if d.platform == "gpu")
    tpus = ", ".join(k for k, d in DEVICES.items() if d.platform == "tpu")
    return (f"TPU GEN:TOPOLOGY with GEN in {tpus}"
            f" and an optional slice count prefix (e.g. {', '.join(TPU_EXAMPLES)}); "
            f"{gpus} GPUs (N <= 8 or a multiple of 8); cpu:N simulated CPU devices")


def parse_target(name: str, cpu_device: Device | None = None) -> Target:
    """Target from its name; TPU device counts come from libtpu's topology description."""
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        slices = int(m.group(1) or 1)
        chips = math.prod(int(x) for x in m.group(3).split("x")) * slices
        topology = f"{m.group(2)}:{m.group(3)}"
        n = len(tpu_devices(topology, slices))
        return Target(name, DEVICES[m.group(2)], n, topology, slices, n // chips)
    m = re.fullmatch(r"(a100|h100|h200|cpu):(\d+)", name)
    if m and (m.group(1) == "cpu" or int(m.group(2)) <= GPUS_PER_NODE
              or int(m.group(2)) % GPUS_PER_NODE == 0) and int(m.group(2)) > 0:
        dev = cpu_device if m.group(1) == "cpu" else DEVICES[m.group(1)]
        return Target(name, dev, int(m.group(2)))
    raise ValueError(f"Unknown target {name!r}; valid targets: {valid_targets()}.")


def tpu_devices(topology: str, slices: int = 1) -> list:
    """The devices of a TPU topology (no TPU needed: libtpu describes it for AOT compiles)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is opened
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"libtpu is not installed. {LIBTPU_HINT}") from e
    from jax.experimental import topologies
    kw = dict(num_slices=slices) if slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **kw).devices)


# Device files of the accelerators JAX drives on Linux: TPUs (accel: v4 and v5p; vfio: v5e and
# v6e), NVIDIA GPUs, AMD GPUs (ROCm's kfd) and WSL's GPU bridge.
ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd",
                     "/dev/dxg")


def skip_absent_tpu() -> bool:
    """Keeps JAX from starting libtpu on a Linux host without any accelerator: installed for
    TPU planning (the `plan` extra), libtpu prints "Failed to find host bounds" and an
    INVALID_ARGUMENT trace at every start there, and JAX then runs on the CPU anyway. Restricts
    JAX to the CPU only when nothing chose its platforms (JAX_PLATFORMS, jax.config) and
    before any backend started; returns whether it did."""
    if (sys.platform != "linux" or os.environ.get("JAX_PLATFORMS")
            or any(glob.glob(p) for p in ACCELERATOR_FILES)
            or importlib.util.find_spec("libtpu") is None):
        return False
    import jax
    if jax.config.jax_platforms:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
