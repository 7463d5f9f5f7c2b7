"""One device mesh over (data, pipeline, context, tensor) and the rules that place every array.

    mc = MeshConfig(data=2, pipeline=1, context=2, tensor=2)  # or from_config(config.mesh)
    mesh = make_mesh(mc)
    check(mc, mesh, model_config, seq_len, global_batch)      # errors before compiling
    axes = model.logical_axes(model.abstract(model_config))
    state = init_sharded(init_fn, mesh, mc, axes)             # never whole on one device
    step = jit_step(step_fn, mesh, mc, state, axes)           # (state, batch) -> (state, metrics)
    with jax.set_mesh(mesh):
        state, metrics = step(state, shard_batch(batch, mesh))

Axes, outermost first (Llama 3 paper §3.3, "4D parallelism", orders them the same way):
  data      batch split; parameters, gradients and optimizer state sharded too (FSDP) unless
            `fsdp=False` (plain replication). Across slices / hosts when there are several.
  pipeline  layer stack split into stages (llama_jax.pipeline).
  context   sequence split (llama_jax.attention.context_parallel_attention).
  tensor    Megatron column/row split of heads and FFN, vocab-parallel embedding and logits;
            innermost, so tensor-parallel groups sit on the fastest links (neighbouring devices).

The mesh axes are `Auto`: parameters and the batch carry shardings from RULES and XLA places
the rest (the all-gathers of FSDP, the all-reduce after the row-parallel `wo` and `w_down`);
context and pipeline parallelism are explicit shard_maps that the model runs through the
backend and model.Parallel values of `execution`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import socket
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llama_jax import attention, backends, model, optim, pipeline, pipeline_manual
from llama_jax.backends import Backend, sharded

AXES = ("data", "pipeline", "context", "tensor")

# Logical axis (model.py) -> mesh axes. A dimension whose size the mesh axes do not divide is
# replicated instead: kv heads when tensor > K (each tensor rank then holds all K; Llama 3 and
# Megatron replicate them the same way), or a vocabulary such as 259 bytes.
RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor",),      # vocab-parallel embedding rows and logit columns
    "embed": ("data",),        # FSDP: D of every matrix over the data axis
    "q_heads": ("tensor",),    # column-parallel wq, row-parallel wo
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),        # column-parallel w_gate / w_up, row-parallel w_down
    "layers": ("pipeline",),   # the stacked L axis: one slice of layers per stage
    "norm": (),
    "lora_rank": (),           # LoRA's R (llama_jax.lora): a handful of columns, replicated
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes (one may be -1: all remaining devices) and the parallel execution options.
    The experiment config's `mesh` section is built from these fields (llama_jax.experiment)."""

    data: int = -1
    pipeline: int = 1
    context: int = 1
    tensor: int = 1
    fsdp: bool = True                    # False: parameters replicated over `data`
    context_impl: str = "all_gather"     # or "ring" (attention.CONTEXT_IMPLS)
    backend: str = "auto"                # backends.NAMES: auto, plain, cpu
    attention: str = "auto"              # the backend's default (Backend.with_attention)
    pipeline_microbatches: int = 0       # M; 0 = the stage count S
    repeats: int = 1                     # circular pipeline repeats R; 1 = GPipe

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.pipeline, self.context, self.tensor)


def from_config(section: Any) -> MeshConfig:
    """A MeshConfig from a config section such as `config.mesh` (a ConfigDict or a dict)."""
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return MeshConfig(**d)


def mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """The four sizes with -1 filled in; the product must be the device count."""
    sizes = list(mc.sizes())
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} must be positive with at most "
                         f"one -1; set the others explicitly.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and n_devices % known == 0:
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, mc.sizes()))} needs {math.prod(sizes)} devices "
                         f"but there are {n_devices}; make the product of the sizes "
                         f"{n_devices} (or set one size to -1).")
    return tuple(sizes)


def make_mesh(mc: MeshConfig, devices=None) -> Mesh:
    """The (data, pipeline, context, tensor) mesh. Over several TPU slices the data axis is
    split across slices (DCN) and the rest stays within a slice (ICI)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mc, len(devices))
    types = (AxisType.Auto,) * len(AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    if shape[0] % slices:
        raise ValueError(f"data axis {shape[0]} does not split over {slices} slices; make "
                         f"mesh.data a multiple of the slice count.")
    ici = (shape[0] // slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1, 1), devices)
    return Mesh(grid, AXES, axis_types=types)


def check(mc: MeshConfig, mesh: Mesh, config, seq_len: int | None = None,
          batch: int | None = None):
    """One-sentence errors for a model or batch the mesh cannot split, before compiling."""
    tp, cp, dp = mesh.shape["tensor"], mesh.shape["context"], mesh.shape["data"]
    if config.n_heads % tp:
        raise ValueError(f"{config.n_heads} attention heads are not divisible by tensor = {tp}; "
                         f"choose a tensor size that divides the head count.")
    if seq_len is not None and cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context = {2 * cp}; "
                         f"choose a seq_len that is a multiple of it.")
    if batch is not None and batch % dp:
        raise ValueError(f"batch of {batch} rows does not split over data = {dp}; make the "
                         f"global batch a multiple of it.")
    if mesh.shape["pipeline"] > 1:
        stages = mesh.shape["pipeline"]
        pipeline.check(config.n_layers, stages, mc.repeats,
                       mc.pipeline_microbatches or stages, batch)
    if mc.context_impl not in attention.CONTEXT_IMPLS:
        raise ValueError(f"Unknown mesh.context_impl {mc.context_impl!r}; valid: "
                         f"{', '.join(attention.CONTEXT_IMPLS)}.")


# ----------------------------------------------------------------------------------------------
# Placement of parameters, optimizer state and batches.


def spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, fsdp: bool = True) -> P:
    """PartitionSpec of one array from its logical axes (RULES, minus size-1 mesh axes and
    axes the mesh lacks, so a 2-D (data, tensor) mesh for decoding or conversion works too)."""
    out = []
    for name, size in zip(axes, shape):
        names = tuple(a for a in RULES[name]
                      if mesh.shape.get(a, 1) > 1 and (fsdp or a != "data"))
        if not names or size % math.prod(mesh.shape[a] for a in names):
            names = ()
        out.append(names[0] if len(names) == 1 else (names or None))
    return P(*out)


def state_shardings(abstract: Any, axes: Any, mesh: Mesh, fsdp: bool = True) -> Any:
    """NamedShardings for any tree holding the parameters (params, TrainState, optimizer
    state): a leaf whose path ends with a parameter's path and whose rank matches gets that
    parameter's spec (so AdamW's mu and nu follow their parameter); everything else is
    replicated. `axes` is model.logical_axes(model) or nnx.state(model, nnx.Param)."""
    by_path = optim.axes_by_path(axes)  # {('layers', 'attn', 'wq'): ('layers', 'embed', ...)}

    def place(path, leaf):
        key = optim.path_key(path)
        for i in range(len(key)):
            names = by_path.get(key[i:])
            if names is not None and len(names) == len(leaf.shape):
                return NamedSharding(mesh, spec(names, leaf.shape, mesh, fsdp))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(place, abstract)


def abstract_state(state: Any, axes: Any, mesh: Mesh, fsdp: bool = True) -> Any:
    """ShapeDtypeStructs of `state` placed by the rules on `mesh`: the restore target that
    loads a checkpoint written on any mesh onto this one (Orbax reads each device's shard)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, state_shardings(state, axes, mesh, fsdp))


def put_state(host_state: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) onto their shardings, each process writing only
    its own devices' shards: works across processes, unlike a plain device_put."""
    put = lambda x, s: jax.make_array_from_callback(  # noqa: E731
        np.shape(x), s, lambda index: np.asarray(x)[index])
    return jax.tree.map(put, host_state, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] batch arrays: rows over data, tokens over context, replicated over the rest."""
    return NamedSharding(mesh, P("data", "context"))


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a [global_batch, T] batch that this process's devices hold: the only rows
    its input pipeline has to produce."""
    shape = (global_batch, mesh.shape["context"])  # any token count the context axis divides
    index = batch_sharding(mesh).addressable_devices_indices_map(shape).values()
    starts = [i[0].start or 0 for i in index]
    stops = [global_batch if i[0].stop is None else i[0].stop for i in index]
    return slice(min(starts), max(stops))


def array_putter(mesh: Mesh) -> Callable[[np.ndarray], jax.Array]:
    """put(x) for one [B_local, T] host array of this process, as shard_batch does for a dict
    (train.py maps it over each batch)."""
    cp = mesh.shape["context"]
    put = functools.partial(jax.make_array_from_process_local_data, batch_sharding(mesh))

    def fn(x):
        x = np.asarray(x)
        return put(x[:, attention.load_balance_order(x.shape[1], cp)] if cp > 1 else x)
    return fn


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Puts this process's rows of a host batch (dict of [B_local, T] arrays) on the mesh.

    With context > 1 the token axis is first put in load-balanced order (rank i gets chunks i
    and 2C-1-i); positions and segment ids travel with their tokens, so the loss is unchanged.
    """
    put = array_putter(mesh)
    return {k: put(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Multi-host start, sharded init and step.


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               timeout_s: int | None = None) -> None:
    """Starts JAX's multi-controller runtime, before anything touches a device.

    Arguments (from flags) win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; with none of them a run is one process, unless `auto`, where
    jax.distributed.initialize() finds the cluster itself (TPU VMs, SLURM, Open MPI).

    Says on stderr whom it waits for. If not every process has connected after `timeout_s`
    (default: $LLAMA_JAX_DISTRIBUTED_TIMEOUT or 300) it ends the process with exit code 2 and
    one sentence naming what did not arrive: JAX aborts the process from C++ at its own
    deadline ("another task died"), so only a watchdog thread can say it first.
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
    index = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    timeout_s = int(timeout_s or env.get("LLAMA_JAX_DISTRIBUTED_TIMEOUT", "300"))
    if address is None and count is None:
        if not auto:
            return
        me, who, args = "This process", "the cluster JAX detects", {}
    elif address is None or count is None or index is None:
        raise ValueError("multi-process runs need a coordinator address, a process count and "
                         "a process id; set all three (flags or JAX_* environment variables).")
    else:
        count, index = int(count), int(index)
        me = f"Process {index} of {count}"
        who = (f"{_others(count)} to connect at {address}" if index == 0 else
               f"the coordinator (process 0) at {address} and the other processes")
        args = dict(coordinator_address=address, num_processes=count, process_id=index)
    print(f"{me}: waiting up to {timeout_s} s for {who}.", file=sys.stderr, flush=True)
    watchdog = threading.Timer(timeout_s, _no_show, (address, count, index, timeout_s, not args))
    watchdog.daemon = True
    watchdog.start()
    try:  # JAX's own deadline later than ours, so that the sentence comes first
        jax.distributed.initialize(**args, initialization_timeout=timeout_s + 30)
    finally:
        watchdog.cancel()


def _no_show(address, count, index, timeout_s, auto) -> None:
    """The watchdog of `initialize`: one sentence naming who did not arrive, then exit 2."""
    hint = "start every process with the same --coordinator_address and --num_processes and its "\
           "own --process_id, or raise --distributed_timeout"
    if auto:
        msg = f"the cluster JAX detected did not come up within {timeout_s} s; {hint}."
    elif index == 0:
        msg = (f"process 0 of {count} waited {timeout_s} s at {address}, but "
               f"{_others(count, some=True)} never connected; {hint}.")
    elif not _listening(address):
        msg = (f"process {index} of {count} waited {timeout_s} s for the coordinator at "
               f"{address}, which is not listening; start process 0 there with the same "
               f"--coordinator_address and --num_processes, or raise --distributed_timeout.")
    else:
        msg = (f"process {index} of {count} reached the coordinator at {address}, but not all "
               f"{count} processes connected within {timeout_s} s; {hint}.")
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()
    os._exit(2)  # the main thread is blocked inside JAX's C++ connect


def _others(count: int, some: bool = False) -> str:
    return "process 1" if count == 2 else f"{'some of ' * some}processes 1-{count - 1}"


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def execution(mesh: Mesh, mc: MeshConfig, backend: Backend | None = None):
    """(backend, model.Parallel) of a model run on this mesh: the backend (default
    backends.get(mc.backend)) with attention mc.attention, context-parallel attention when the context
    axis is split, the pipelined layer loop when the pipeline axis is, and the activation
    sharding at block boundaries (the pipeline's stages run without it: inside its shard_map
    the activations are per-stage values). Build the model with them:
    `model.abstract(config, *execution(mesh, mc))`."""
    backend = (backend or backends.get(mc.backend)).with_attention(mc.attention)
    local = backend.attention or attention.IMPLS[backend.default_attention]
    cp = mc.context_impl if mesh.shape["context"] > 1 else None
    name = backend.default_attention if mc.attention == "auto" else mc.attention
    if name in backends.KERNELS:  # a Pallas kernel: per-device rows and heads (backends/sharded.py)
        backend = dataclasses.replace(backend, attention=functools.partial(
            sharded.sharded_attention, mesh=mesh, local=local, context_impl=cp))
    elif cp:
        backend = dataclasses.replace(backend, attention=functools.partial(
            attention.context_parallel_attention, mesh=mesh, impl=cp, local=local))
    layers = None
    if mesh.shape["pipeline"] > 1:
        # a kernel's stages run on local shards (Shardy does not nest its shard_map in ours)
        run = (pipeline_manual if name in backends.KERNELS else pipeline).pipeline_layers
        layers = functools.partial(run, mesh=mesh, context_impl=cp,
                                   microbatches=mc.pipeline_microbatches, repeats=mc.repeats,
                                   local_attention=local, weight_spec=functools.partial(
                                       spec, mesh=mesh, fsdp=False))
    # block boundaries: without this XLA may shard D of the activations over data like the
    # FSDP weights instead of gathering the weights (half the tokens/s in tools/bench_mesh.py)
    x_sharding = NamedSharding(mesh, P("data", "context", None))
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=x_sharding)
    return backend, model.Parallel(layers=layers, constrain=constrain)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, mc: MeshConfig, axes: Any) -> Any:
    """Runs init_fn (e.g. model creation + optimizer init) under jit with out_shardings from
    the rules, so every device creates only its own shards of the state."""
    shardings = state_shardings(jax.eval_shape(init_fn), axes, mesh, mc.fsdp)
    with jax.set_mesh(mesh):
        return jax.jit(init_fn, out_shardings=shardings)()


def jit_step(step_fn: Callable, mesh: Mesh, mc: MeshConfig, state: Any, axes: Any,
             donate: bool = True, frozen: Any = None, frozen_axes: Any = None) -> Callable:
    """jit of the pure step_fn(state, batch) -> (state, metrics) with the state placed by the
    rules and the batch by batch_sharding; the step's model should run as `execution` says
    for this mesh. `state` may be abstract (ShapeDtypeStructs). Call it under
    `jax.set_mesh(mesh)`. Arrays the step reads but never changes (`frozen`: a LoRA base,
    placed by the rules with `frozen_axes`) go to step_fn(state, batch, frozen), not donated.
    """
    shardings = state_shardings(state, axes, mesh, mc.fsdp)
    ins = (shardings, batch_sharding(mesh))
    if frozen is not None:
        ins += (state_shardings(frozen, frozen_axes, mesh, mc.fsdp),)
    step = jax.jit(step_fn, in_shardings=ins, out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,) if donate else ())
    return step if frozen is None else functools.partial(_with_frozen, step, frozen)


def _with_frozen(step, frozen, state, batch):
    return step(state, batch, frozen)
