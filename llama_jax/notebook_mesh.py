"""Pictures of how arrays lie over a mesh, and the planner's memory table for a TPU topology,
for notebooks/sharding.ipynb.

    fig, ax = plt.subplots()
    notebook_mesh.draw_layout(ax, w_sharding, (D, F), names=("D", "F"))   # who holds which block
    report = notebook_mesh.tpu_memory(config, "v5e:2x4")   # plan.plan, or an XLA:CPU estimate
    notebook_mesh.plot_memory(ax, report)

TPU plans compile with the TPU compiler, which comes with libtpu (the `plan` extra, present on
every TPU runtime); on a small CPU host that takes minutes for a real model. Elsewhere the same
sharded step is compiled by XLA:CPU for as many simulated devices as the topology has chips, in
seconds, and its per-device bytes are set against the TPU's memory: parameter and optimizer
bytes are exact (they follow from the sharding rules); temporaries are XLA:CPU's, which keeps
stacked bf16 residuals in f32 and so overstates them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import numpy as np

from llama_jax import hardware, plan

GiB = 2**30


def blocks(sharding, shape, dims=(0, 1)) -> dict[tuple, list[int]]:
    """{((row start, stop), (col start, stop)): device ids holding that block} of the 2-D view
    of an array of `shape` placed by `sharding` along axes `dims` (other axes ignored)."""
    out: dict[tuple, list[int]] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        key = tuple((index[d].start or 0, shape[d] if index[d].stop is None else index[d].stop)
                    for d in dims)
        out.setdefault(key, []).append(device.id)
    return {k: sorted(v) for k, v in sorted(out.items())}


def draw_layout(ax, sharding, shape, dims=(0, 1), names=("rows", "cols"), title=""):
    """Draws the blocks of `blocks` as rectangles labelled with the ids of the devices that hold
    them: one colour per block, so a replicated block shows as several ids in one rectangle."""
    import matplotlib
    from matplotlib import patches
    held = blocks(sharding, shape, dims)
    colours = matplotlib.colormaps["tab20"]
    for i, (((r0, r1), (c0, c1)), ids) in enumerate(held.items()):
        ax.add_patch(patches.Rectangle((c0, r0), c1 - c0, r1 - r0, facecolor=colours(i % 20),
                                       edgecolor="black"))
        label = ",".join(map(str, ids)) if len(ids) <= 4 else f"{ids[0]}…{ids[-1]} ({len(ids)})"
        ax.text((c0 + c1) / 2, (r0 + r1) / 2, label, ha="center", va="center", fontsize=8)
    rows, cols = shape[dims[0]], shape[dims[1]]
    ax.set(xlim=(0, cols), ylim=(rows, 0), xlabel=f"{names[1]} ({cols})",
           ylabel=f"{names[0]} ({rows})", title=title or str(getattr(sharding, "spec", "")))
    return held


# ----------------------------------------------------------------------------------------------
# The planner's memory table for a TPU topology.


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_memory(config, topology: str, compiler: str = "auto") -> dict:
    """The plan (llama_jax.plan's report dict) of `config` on a single-slice TPU `topology`
    such as "v5e:2x4"; report["source"] says how it was made:
      "tpu": compiled by libtpu for the topology (exact; minutes on a small host, seconds on
        a TPU VM's);
      "cpu": compiled by XLA:CPU for one simulated device per chip, judged against the TPU's
        memory (v5e, v5p, v6e: one device per chip);
      "auto": "tpu" on a TPU runtime, "cpu" elsewhere.
    """
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology)
    if not m:
        raise ValueError(f"topology {topology!r} is not one slice of TPU GEN:AxB[xC] with GEN "
                         f"v4, v5e, v5p or v6e, e.g. v5e:2x4.")
    if compiler == "auto":
        compiler = "tpu" if jax.default_backend() == "tpu" else "cpu"
    if compiler == "tpu" or m.group(1) == "v4":  # v4: two devices per chip, libtpu knows them
        if not has_libtpu():
            raise RuntimeError(f"compiling for {topology} needs libtpu. {hardware.LIBTPU_HINT}")
        if jax.default_backend() != "tpu":  # libtpu's start-up would look for a TPU VM's hosts
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        return dict(plan.plan(config, topology), source=f"compiled by libtpu for {topology}")
    if compiler != "cpu":
        raise ValueError(f"compiler {compiler!r} must be 'auto', 'tpu' or 'cpu'.")
    chips = math.prod(int(x) for x in m.group(2).split("x"))
    report = plan.plan(config, f"cpu:{chips}")
    device = hardware.DEVICES[m.group(1)]
    report.update(target=topology, device=device.name, estimate=True, source=(
        f"estimate: compiled by XLA:CPU for {chips} simulated devices and set against "
        f"{device.name} memory; parameters and optimizer exact, temporaries XLA:CPU's "
        f"(it keeps bf16 residuals in f32: an overestimate); compiler='tpu' compiles with "
        f"libtpu"))
    if "memory" in report:
        mem = report["memory"]
        mem["capacity"] = device.hbm_bytes
        report["fits"] = mem.get("total", math.inf) <= device.hbm_bytes
        report.pop("reason", None)
        if not report["fits"]:
            report["reason"] = (f"needs about {mem.get('total', math.inf) / GiB:.1f} GiB per "
                                f"device, {device.hbm_bytes / GiB:.1f} GiB on {device.name}; "
                                f"shard more (mesh.tensor, mesh.pipeline, more chips), lower "
                                f"data.global_batch or raise optim.accumulation_steps")
    return report


def memory_table(report: dict) -> str:
    """The report's per-device memory as text lines (GiB)."""
    mem = report.get("memory", {})
    lines = [f"{report['config']} on {report['target']} ({report['device']}), mesh "
             + " · ".join(f"{k} {v}" for k, v in report["mesh"].items() if v > 1),
             report.get("source", ""), "  per device            GiB"]
    for key in ("params", "optimizer", "temporaries", "other", "total", "capacity"):
        if key in mem:
            lines.append(f"    {key:<18}{mem[key] / GiB:8.2f}")
    lines.append("  fits" if report.get("fits") else
                 f"  DOES NOT FIT: {report.get('reason', 'more than the device memory')}")
    return "\n".join(lines)


def plot_memory(ax, report: dict):
    """One stacked bar of the per-device bytes against a line at the device's memory."""
    mem, bottom = report["memory"], 0.0
    for key in ("params", "optimizer", "temporaries", "other"):
        if key in mem:
            ax.bar([0], [mem[key] / GiB], bottom=bottom, label=key, width=0.5)
            bottom += mem[key] / GiB
    ax.axhline(mem["capacity"] / GiB, color="black", linestyle="--",
               label=f"{report['device']} memory")
    ax.set(xticks=[], ylabel="GiB per device", title=f"{report['config']} on {report['target']}")
    ax.legend(fontsize=8)
