"""Plan a training run before booking the machine: compile the real sharded train step for a
target ahead of time and report memory per device, FLOPs and a roofline step time.

    config = plan.load_config("experiments/configs/llama3_8b.py", ["--config.mesh.tensor=4"])
    report = plan.plan(config, "v5p:4x4x4")          # a dict; plan.format_report(report)

Nothing is allocated: the train state and batch are ShapeDtypeStructs (`eval_shape`) carrying
the shardings of llama_jax.sharding, and `jax.jit(step).lower(...).compile()` runs XLA's real
SPMD partitioner and buffer assignment for the target:
- TPU: devices of a libtpu topology description, compiled by the TPU compiler itself.
- GPU (nodes of 8 H100 / H200): simulated devices of the CPU backend in a subprocess, so an
  estimate: the shapes, shardings and collectives are the real program's, XLA:GPU's fusions and
  buffer reuse are not. The Pallas GPU kernel is an opaque stand-in there with the kernel's
  inputs, outputs and residuals (backends/gpu.py planned_mha; FLOPs from gpu.kernel_flops).
  Over MAX_SIMULATED devices a smaller stand-in mesh is compiled with the same rows and model
  shards per device (_simulated_mesh); parameter and optimizer bytes are still computed for
  the full mesh.
- cpu:N: simulated CPU devices, in this process when it has exactly N.

Per-device bytes: parameters and optimizer state from their shard shapes; "temporaries" are
XLA's temp allocation (activations kept for the backward pass, gathered weights, gradients in
flight); total = arguments + outputs − donated aliases + temporaries (memory_analysis()).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from llama_jax import backends, experiment, flops, hardware, hlo_cost, optim, progress
from llama_jax import sharding, train
from llama_jax import model as model_lib
from llama_jax.config import ModelConfig

# CPU devices compiled at once for GPU targets (2,048: ~25 s for 405B); tools/plan.py
# --max_devices sets it (through the environment, so the planning subprocess sees it too).
MAX_SIMULATED = int(os.environ.get("LLAMA_JAX_PLAN_MAX_DEVICES", "2048"))
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------------------------
# Config: the experiment file plus --config.a.b=value overrides.


def load_config(path: str, overrides=()):
    """The ConfigDict of `path[:arg]` (experiment.load) with overrides applied."""
    config = experiment.load(path)
    for item in overrides:
        set_value(config, item)
    return config


def set_value(config, item: str) -> None:
    """Applies one `--config.a.b=value` (or `a.b=value`), parsed as the field's current type."""
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if not sep or leaf not in node:
        raise ValueError(f"Unknown config override {item!r}; use --config.SECTION.FIELD=VALUE "
                         f"with a field of the config file.")
    old = node[leaf]
    if isinstance(old, bool):
        value = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
        value = type(old)(float(raw)) if isinstance(old, int) and "." not in raw else float(raw)
    else:
        value = raw
    with config.unlocked():
        node[leaf] = value


# ----------------------------------------------------------------------------------------------
# The abstract train state, batch and the jitted sharded step for one mesh.


def build(config, mesh, mc: sharding.MeshConfig, platform: str = "cpu"):
    """(jitted step, abstract state, abstract batch, logical axes) for `mesh` of a `platform`
    target; nothing allocated."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    # the target's backend (its attention kernel), never the cpu one of the machine that plans
    backend = backends.for_target(platform, mc.attention)
    mc = dataclasses.replace(mc, attention="auto")  # the backend's default: the one chosen
    abstract_model = model_lib.abstract(mcfg, *sharding.execution(mesh, mc, backend))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    params = nnx.to_pure_dict(params)
    axes = model_lib.logical_axes(abstract_model)
    ocfg = train.optim_config(config)
    tx = optim.make_optimizer(ocfg, axes)
    state = jax.eval_shape(lambda p: train.init_state(p, tx), params)
    s = train.Step(graphdef, tx, optim.make_schedule(ocfg), z_loss=config.train.z_loss,
                   microbatches=config.optim.accumulation_steps)
    step = sharding.jit_step(lambda st, b: train.train_step(st, b, s), mesh, mc, state, axes)
    shardings = sharding.state_shardings(state, axes, mesh, mc.fsdp)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         state, shardings)
    rows, t = config.data.global_batch, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=sharding.batch_sharding(mesh))
             for k in BATCH_KEYS}
    return step, state, batch, axes, backend.default_attention  # the attention planned


def shard_bytes(tree, axes, mesh, fsdp: bool) -> int:
    """Bytes per device of a tree of abstract arrays placed by the sharding rules on `mesh`."""
    shardings = sharding.state_shardings(tree, axes, mesh, fsdp)
    sizes = jax.tree.map(lambda a, sh: math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize,
                         tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def check_layout(config, mesh, mc) -> None:
    """Sharding's and the trainer's one-sentence errors for a layout, before compiling."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    sharding.check(mc, mesh, mcfg, config.data.seq_len, config.data.global_batch)
    rows_per_rank = config.data.global_batch // mesh.shape["data"]
    if rows_per_rank % config.optim.accumulation_steps:
        raise ValueError(f"{rows_per_rank} rows per data rank do not split into "
                         f"optim.accumulation_steps = {config.optim.accumulation_steps}; pick a "
                         f"divisor.")


# ----------------------------------------------------------------------------------------------
# One compile on the devices of this process (or of a TPU topology).


def compile_on(config, devices, target: hardware.Target, full_shape=None) -> dict:
    """Compiles the step on `devices` and measures it; `full_shape` (the target's mesh sizes)
    when `devices` is a reduced stand-in (GPU targets over MAX_SIMULATED devices)."""
    mc = sharding.from_config(config.mesh)
    mesh = sharding.make_mesh(mc, devices)
    check_layout(config, mesh, mc)
    step, state, batch, axes, attention = build(config, mesh, mc, target.device.platform)
    full = AbstractMesh(tuple(full_shape or mesh.axis_sizes), sharding.AXES)
    out = dict(attention=attention, params=shard_bytes(state.params, axes, full, mc.fsdp),
               optimizer=shard_bytes(state.opt_state, axes, full, mc.fsdp),
               compiled_state=shard_bytes((state.params, state.opt_state), axes, mesh, mc.fsdp))
    t0 = time.perf_counter()
    # the precision a run compiles with: Mosaic rejects bf16 kernel matmuls asked for fp32
    # contract precision, which a process-wide jax_default_matmul_precision="highest" (the
    # tests') would ask of the splash kernel
    precision = (jax.default_matmul_precision("default") if target.device.platform == "tpu"
                 else contextlib.nullcontext())
    try:
        with jax.set_mesh(mesh), precision:
            compiled = step.lower(state, batch).compile()
    except Exception as e:  # XLA refuses programs that exceed a TPU's HBM
        if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
            raise
        return dict(out, compile_error=str(e).strip().splitlines()[0][:400],
                    compile_s=time.perf_counter() - t0)
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.update(temporaries=int(mem.temp_size_in_bytes), arguments=int(mem.argument_size_in_bytes),
               outputs=int(mem.output_size_in_bytes), aliased=int(mem.alias_size_in_bytes))
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["xla_cost_analysis_flops"] = float(ca.get("flops", 0.0))
    cost = hlo_cost.analyse(compiled.as_text(), _domains(mesh, target))
    out["kernel_flops"], out["uncounted"] = _kernel_flops(cost, config, mesh)
    cost.flops += out["kernel_flops"]
    out.update(hlo_flops=cost.flops, hbm_bytes=cost.hbm_bytes, fast_bytes=cost.fast_bytes,
               slow_bytes=cost.slow_bytes, collectives=cost.collectives,
               compiled_mesh=dict(zip(sharding.AXES, mesh.axis_sizes)))
    return out


def _kernel_flops(cost: hlo_cost.Cost, config, mesh) -> tuple[float, list[str]]:
    """FLOPs per device of the opaque kernels the compiled step runs (each splash call, or the
    GPU kernel's stand-in, as often as the HLO runs it: twice forward per layer under
    remat=full), and what the HLO count misses: loops of unreadable trip count (counted once),
    kernel calls of unknown cost."""
    from llama_jax.backends import gpu, tpu  # noqa: PLC0415 (Pallas's ops: only when needed)
    c = ModelConfig.from_dict(config.model.to_dict())
    total, missed = 0.0, [f"while loop counted once: {n}" for n in cost.unknown_loops]
    for name, target, shapes, times in cost.custom_calls:
        f = tpu.kernel_flops(name, shapes, config.data.seq_len, c.n_heads // c.n_kv_heads,
                             mesh.shape["context"])
        f = gpu.kernel_flops(name, shapes) if f is None else f
        if f is not None:
            total += times * f
        elif target in hlo_cost.KERNEL_TARGETS:
            missed.append(f"custom call without a FLOP count: {name}")
    return total, missed


def _domains(mesh, target: hardware.Target) -> list[int]:
    """Slow-link domain of each logical device id (mesh order): TPU slice or GPU node."""
    flat = list(mesh.devices.flat)
    if target.device.platform == "tpu":
        return [getattr(d, "slice_index", 0) or 0 for d in flat]
    # GPUs: mesh order with tensor innermost puts each run of 8 mesh positions in one node, as
    # jax.make_mesh does on a GPU cluster (the simulated CPU ids carry no such placement).
    return [i // hardware.GPUS_PER_NODE for i in range(len(flat))]


MIN_DATA = 8  # a stand-in keeps at least this many data ranks before it drops stages


def _simulated_mesh(config, target: hardware.Target) -> tuple[int, tuple, tuple[int, int]]:
    """(devices to simulate, full mesh sizes, (kd, kp)): over MAX_SIMULATED devices, a
    stand-in with every device's rows and model shards unchanged: the data axis shrinks by kd
    (the global batch with it) while it keeps MIN_DATA ranks, then the pipeline axis by kp with
    the layer stack (the same layers per stage), then data again. A smaller data axis makes
    FSDP-sharded temporaries (gradients, gathered weights) kd times too large; fewer stages
    shorten the pipeline loop (see _scale_loop) and put kp times the rows on each stage's loss.
    """
    mc = sharding.from_config(config.mesh)
    full = sharding.mesh_shape(mc, target.n_devices)
    n, data, pipe = target.n_devices, full[0], full[1]
    while n > MAX_SIMULATED and data % 2 == 0 and data // 2 >= MIN_DATA:
        data, n = data // 2, n // 2
    while n > MAX_SIMULATED and pipe % 2 == 0 and pipe > 2:
        pipe, n = pipe // 2, n // 2
    while n > MAX_SIMULATED and data % 2 == 0:
        data, n = data // 2, n // 2
    kd, kp = full[0] // data, full[1] // pipe
    with config.unlocked():
        config.mesh.data, config.mesh.pipeline = data, pipe
        config.data.global_batch //= kd
        config.model.n_layers //= kp
    return n, full, (kd, kp)


def _scale_loop(m: dict, config, full, kp: int) -> None:
    """Scales a stand-in's per-step costs (FLOPs, HBM and collective bytes) from its S/kp-stage
    pipeline loop to the target's S stages: R·M + S − 1 steps instead of R·M + S/kp − 1
    (an approximation: the loss and optimizer parts are scaled too)."""
    work = config.mesh.repeats * (config.mesh.pipeline_microbatches or full[1])
    f = (work + full[1] - 1) / (work + full[1] // kp - 1)
    for key in ("hlo_flops", "hbm_bytes", "fast_bytes", "slow_bytes"):
        m[key] *= f
    m["collectives"] = {k: v * f for k, v in m["collectives"].items()}


# ----------------------------------------------------------------------------------------------
# Plans: a compile per layout (in a subprocess unless this process has the devices), the
# roofline on the target's numbers, and the report.


def cpu_device(config) -> hardware.Device:
    """This machine's CPU as a planning target (peak from config.train.cpu_peak_tflops)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return hardware.Device("CPU (simulated devices)", "cpu", config.train.cpu_peak_tflops * 1e12,
                           mem, 20e9, 10e9, 1, 10e9, "node", "host CPU; peak from the config")


def plan(config, target_name: str) -> dict:
    """The plan of `config` (its mesh section) on the target; see format_report."""
    return plan_many(config, target_name, [[]])[0]


def plan_many(config, target_name: str, layouts) -> list[dict]:
    """Plans of `config` with each list of overrides in `layouts`, compiled in one process."""
    target = hardware.parse_target(target_name, cpu_device(config))
    n = 1
    for overrides in layouts:  # wrong mesh sizes: one sentence now, not after a subprocess
        c = load_config_copy(config)
        for item in overrides:
            set_value(c, item)
        sharding.mesh_shape(sharding.from_config(c.mesh), target.n_devices)
        n = max(n, _simulated_mesh(c, target)[0])
    in_process = (target.device.platform == "tpu" or
                  (target.device.platform == "cpu" and jax.device_count() == target.n_devices
                   and jax.devices()[0].platform == "cpu"))
    if in_process:
        return [_plan_one(config, target, overrides)
                for overrides in progress.steps(layouts, f"compiling for {target_name}")]
    request = json.dumps(dict(config=config.to_json(), target=target_name, layouts=layouts))
    # all-reduce-promotion (CPU only: bf16 all-reduces run in f32) aborts XLA on the pipeline's
    # bf16 all-reduces ("Invalid binary instruction opcode copy", jaxlib 0.10.2); these
    # programs are compiled, never run, so the pass is not needed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        " --xla_disable_hlo_passes=all-reduce-promotion"))
    # On a terminal the worker's stderr (its progress bar) shows through; in a log it is kept
    # for the error message.
    shown = sys.stderr.isatty()
    proc = subprocess.run([sys.executable, "-m", "llama_jax.plan"], input=request, text=True,
                          stdout=subprocess.PIPE, stderr=None if shown else subprocess.PIPE,
                          env=env)
    if proc.returncode:
        why = "its errors are above" if shown else proc.stderr.strip()[-2000:]
        raise RuntimeError(f"the planning subprocess failed: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plan_one(config, target: hardware.Target, overrides) -> dict:
    config = load_config_copy(config)
    for item in overrides:
        set_value(config, item)
    mc = sharding.from_config(config.mesh)
    full = sharding.mesh_shape(mc, target.n_devices)  # raises if the sizes do not match
    if target.device.platform == "tpu":
        devices = hardware.tpu_devices(target.topology, target.slices)
        n_sim, kd, kp = target.n_devices, 1, 1
    else:
        n_sim, _, (kd, kp) = _simulated_mesh(config, target)  # shrinks data, pipeline
        devices = jax.devices()[:n_sim]
    try:  # parameter and optimizer bytes on the full mesh (at the stand-in's stage count:
        # the same layers per stage)
        measured = compile_on(config, devices, target,
                              (full[0], full[1] // kp, *full[2:]))
        if n_sim != target.n_devices and kp > 1 and "hlo_flops" in measured:
            _scale_loop(measured, config, full, kp)
    except (ValueError, NotImplementedError) as e:  # sharding rules or the TPU's physical
        # mesh (mesh_utils: a logical axis that splits a torus axis) reject the layout
        measured = dict(invalid=str(e))
    if n_sim != target.n_devices:  # report the target's batch and model, not the stand-in's
        with config.unlocked():
            config.data.global_batch *= kd
            config.model.n_layers *= kp
            config.mesh.data, config.mesh.pipeline = full[0], full[1]
    return report(config, target, full, measured, overrides)


def load_config_copy(config):
    import ml_collections
    return ml_collections.ConfigDict(config.to_dict())


# The compiler's count (HLO dots + kernel calls, as often as they run) against flops.py's.
FLOPS_GAP = ("compiler FLOPs are what the step runs, analytic the useful 6ND + causal "
             "attention MFU counts: remat=full reruns every projection but the down one (x1.25 "
             "on the matmuls), splash and pallas_gpu run 11 T x H products per token and head "
             "(remat=full) for flops.py's 6 over whole diagonal blocks, chunked and reference "
             "attention compute every key block.")


def report(config, target: hardware.Target, full_shape, m: dict, overrides) -> dict:
    """Memory, FLOPs and roofline of one compiled layout as a JSON-able dict."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    rows, t = config.data.global_batch, config.data.seq_len
    dev, n = target.device, target.n_devices
    capacity = dev.hbm_bytes / target.devices_per_chip
    out = dict(config=mcfg.name, target=target.name, device=dev.name, devices=n,
               estimate=target.estimate, overrides=list(overrides),
               mesh=dict(zip(sharding.AXES, full_shape)), remat=mcfg.remat,
               attention=m.get("attention", config.mesh.attention),
               global_batch=rows, seq_len=t,
               accumulation_steps=config.optim.accumulation_steps,
               pipeline_microbatches=config.mesh.pipeline_microbatches)
    if "invalid" in m:
        return dict(out, fits=False, reason=f"invalid layout: {m['invalid']}")
    analytic = flops.train_flops_per_token(mcfg, t) * rows * t / n
    mem = dict(params=m["params"], optimizer=m["optimizer"], capacity=capacity)
    if "compile_error" in m:
        # XLA:TPU names what it needed: "... memory required for HLO temporaries (2.94T) ..."
        need = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", m["compile_error"])
        if need:
            mem["temporaries"] = float(need.group(1)) * 1024 ** " KMGT".index(need.group(2) or " ")
            mem["total"] = m["params"] + m["optimizer"] + mem["temporaries"]
        return dict(out, memory=mem, fits=False, analytic_flops=analytic, reason=(
            f"the compiler ran out of device memory ({m['compile_error']})"))
    # other: batch, counters, metrics and undonated outputs, from the compiled mesh's buffers
    # (on a stand-in mesh its own parameter shards are larger than the full mesh's)
    other = m["arguments"] + m["outputs"] - m["aliased"] - m["compiled_state"]
    total = m["params"] + m["optimizer"] + m["temporaries"] + other
    mem.update(temporaries=m["temporaries"], other=other, total=total)
    fits = total <= capacity
    rl = hardware.roofline(dev, flops=m["hlo_flops"], hbm_bytes=m["hbm_bytes"],
                           fast_bytes=m["fast_bytes"], slow_bytes=m["slow_bytes"],
                           devices_per_chip=target.devices_per_chip)
    peak = dev.peak_flops / target.devices_per_chip
    uncounted = list(m.get("uncounted", []))
    if m["hlo_flops"] < analytic:  # the step cannot run less than its useful work
        uncounted.append("the compiled step shows fewer FLOPs than flops.py's useful ones: "
                         "work the HLO hides (an opaque kernel) is missing, so the predicted "
                         "MFU is too high")
    out.update(memory=mem, fits=fits, compile_s=round(m["compile_s"], 1),
               compiled_mesh=m["compiled_mesh"],
               flops=dict(compiler=m["hlo_flops"], analytic=analytic,
                          kernel=m.get("kernel_flops", 0.0),
                          xla_cost_analysis=m["xla_cost_analysis_flops"],
                          executed_over_analytic=m["hlo_flops"] / analytic,
                          uncounted=uncounted, why=FLOPS_GAP),
               roofline=dict(compute_s=rl.compute_s, hbm_s=rl.hbm_s, comm_s=rl.comm_s,
                             step_s=rl.step_s, serial_s=rl.serial_s, bound=rl.bound,
                             mfu=analytic / (rl.step_s * peak) if rl.step_s else 0.0,
                             tokens_per_s=rows * t / rl.step_s if rl.step_s else 0.0),
               collectives=m["collectives"])
    if not fits:
        out["reason"] = (f"needs {total / 2**30:.1f} GiB per device but {dev.name} has "
                         f"{capacity / 2**30:.1f} GiB: parameters {m['params'] / 2**30:.1f}, "
                         f"optimizer {m['optimizer'] / 2**30:.1f}, temporaries "
                         f"{m['temporaries'] / 2**30:.1f} GiB; shard more (mesh.tensor, "
                         f"mesh.pipeline, a larger data axis), remat=full or more "
                         f"optim.accumulation_steps")
    return out


def _worker() -> None:
    """`python -m llama_jax.plan` < request JSON: plans in this process, prints one JSON line."""
    import ml_collections
    request = json.loads(sys.stdin.read())
    config = ml_collections.ConfigDict(json.loads(request["config"]))
    target = hardware.parse_target(request["target"], cpu_device(config))
    results = [_plan_one(config, target, o)
               for o in progress.steps(request["layouts"], f"compiling for {target.name}")]
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    _worker()
