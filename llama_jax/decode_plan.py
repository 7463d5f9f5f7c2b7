"""What one decode step costs on a target, from its compiled program (no accelerator needed).

    row = decode_plan.plan_decode(config, "v5e:2x2", batch=1, cache_len=8192,
                                  decode_attention="ragged_tpu")

`decode.decode_step` (the body of `decode.loop`) is compiled ahead of time for one device of
the target, or a (data, tensor) mesh of its devices with the weights and cache placed as
decode.generate places them (a TPU: libtpu's topology devices, compiled by the TPU compiler
itself; `cpu`: this host) and read back, per device:
- bytes/step: XLA's cost analysis of the compiled step (a Pallas kernel counts what its
  CostEstimate says: the cache up to the full length, an upper bound);
- roofline bytes: what a step must read at least, the weights once (the head included, the
  embedding only its B rows) and the K/V cache once up to the cache length;
- kernels/step: the instructions of the compiled step that run as their own kernel (fusions,
  custom calls, copies, in-place updates, unfused scalar ops, ...), by opcode; a TPU's
  asynchronous HBM <-> VMEM moves apart;
- cache copies: copies of at least one layer's K cache [B, S, K, H] in size (the cache, or
  anything as large): the cache must be updated in place and read where it lies, so there
  should be none; copy-starts as large (a TPU's moves into VMEM) are `cache_prefetches`;
- collectives by opcode, and `cache_collectives`: those as large as a layer's cache shard
  (a decode kernel must read the cache where it lies, not gathered);
- with loop=True, the cache copies of compiled decode.loop inside its body and outside it.
Predicted tokens/s = batch x HBM bandwidth / max(bytes/step, roofline bytes).

Axis letters: B batch, S cache slots, K kv heads, H head dim, L layers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from llama_jax import backends, decode, decode_setup, hardware, hlo_cost
from llama_jax.backends import decode_sharded
from llama_jax import model as model_lib
from llama_jax.decode_forward import Weights, _relayout
from llama_jax.sampling import SamplingParams

# Instructions that are not kernels of their own: bookkeeping, and the TPU's asynchronous
# moves between HBM and VMEM (memory-space assignment's prefetches of weight slices and their
# ConcatBitcast reassembly), counted apart as `async_moves`.
NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "opt-barrier", "partition-id", "replica-id", "iota"}
ASYNC_MOVES = {"copy-start", "copy-done", "slice-start", "slice-done"}


def _bytes(shape: str) -> int:
    return int(hlo_cost.array_bytes(shape))


def _weight_shardings(model, mesh):
    """NamedShardings of _relayout's (embed, norm, head, layers) for a model placed on `mesh`
    by decode.shard (each parameter by its logical axes; a layer's slice drops the L axis)."""
    def place(axes, shape):
        return NamedSharding(mesh, decode_setup._spec(axes, shape, mesh))
    one = jax.tree.map(lambda v: place(v.axes[1:], v.shape[1:]), nnx.state(model.layers),
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
    embed = model.embed
    head = (place(embed.axes[::-1], embed.shape[::-1]) if model.config.tie_embeddings
            else place(model.lm_head.axes, model.lm_head.shape))
    return (place(embed.axes, embed.shape), place(model.norm.scale.axes, model.norm.scale.shape),
            head, (nnx.to_pure_dict(one),) * model.config.n_layers)


def abstract_step_inputs(config, backend, batch: int, cache_len: int, where):
    """ShapeDtypeStructs of decode_step's (weights, state, sampling, stop_ids, max_new) for
    `batch` rows and a cache of `cache_len` slots, on `where`: one device, or a (data,
    tensor) mesh, placed there as decode.generate places them (weights by decode.shard, the
    cache by cache_shardings, the other per-row arrays over data)."""
    model = model_lib.abstract(config, backend)
    graphdef, state = nnx.split(model)
    weights = Weights(config, backend, *jax.eval_shape(_relayout, graphdef, state, None))

    others = (SamplingParams().arrays(), jnp.zeros((decode.MAX_STOP_IDS,), jnp.int32),
              jnp.int32(1))
    # the state decode.start returns (abstractly: nothing runs) for 16-token prompts
    state = jax.eval_shape(functools.partial(decode.start, cache_len=cache_len, n_buffer=16),
                           weights, jnp.zeros((batch, 16), jnp.int32),
                           jnp.ones((batch,), jnp.int32), jax.random.PRNGKey(0), *others)
    place = lambda a, on: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on)  # noqa: E731
    if not isinstance(where, Mesh):
        on = SingleDeviceSharding(where)
        return jax.tree.map(lambda a: place(a, on), (weights, state, *others))
    every = NamedSharding(where, PartitionSpec())
    rows = lambda a: NamedSharding(where, PartitionSpec(  # noqa: E731
        *(("data",) if a.ndim and a.shape[0] == batch else ())))
    weights = dataclasses.replace(weights, **dict(zip(
        ("embed", "norm", "head", "layers"), jax.tree.map(
            place, (weights.embed, weights.norm, weights.head, weights.layers),
            _weight_shardings(model, where)))))
    state = jax.tree.map(lambda a: place(a, rows(a)), state)
    state = dataclasses.replace(state, cache=jax.tree.map(
        place, state.cache, decode_setup.cache_shardings(where, config)))
    return (weights, state, *jax.tree.map(lambda a: place(a, every), others))


def target_mesh(devices, data: int, tensor: int) -> Mesh:
    """A (data, tensor) mesh over the first data x tensor of `devices` (decode.make_mesh's
    axes, for a target's devices)."""
    if data * tensor > len(devices):
        raise ValueError(f"a {data}x{tensor} mesh needs {data * tensor} devices but the target "
                         f"has {len(devices)}; choose --data x --tensor <= {len(devices)}.")
    auto = jax.sharding.AxisType.Auto
    return Mesh(np.asarray(devices[:data * tensor]).reshape(data, tensor), ("data", "tensor"),
                axis_types=(auto, auto))


def compile_step(config, backend, batch: int, cache_len: int, where, loop: bool = False):
    """decode.decode_step (state donated) compiled for `where` (a device or a mesh), or with
    loop=True decode.loop (generate's while loop of steps); on a mesh the backend's decode
    kernel runs per device (decode_sharded.on_mesh, as prepare)."""
    if isinstance(where, Mesh):
        backend = decode_sharded.on_mesh(backend, where, config)
    fn = decode.loop if loop else decode.decode_step
    return fn.lower(*abstract_step_inputs(config, backend, batch, cache_len, where)).compile()


def roofline_bytes(config, batch: int, length: int, data: int = 1, tensor: int = 1) -> int:
    """Bytes one device reads at least in a step: every weight of its shard once (the
    embedding only its rows' B; a tied head reads the table once) and its rows' K/V cache up
    to `length` slots once. On a (data, tensor) mesh the heads, mlp and vocab split over
    tensor where it divides them (decode.shard), the rows over data; norms are whole."""
    c, item = config, jnp.dtype(config.dtype).itemsize
    part = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731
    n, k, f = part(c.n_heads), part(c.n_kv_heads), part(c.ffn_dim)
    per_layer = 2 * c.dim * n * c.head_dim + 2 * c.dim * k * c.head_dim + 3 * c.dim * f + 2 * c.dim
    b = batch // data
    weights = c.n_layers * per_layer + c.dim + c.dim * part(c.vocab_size) + b * c.dim
    cache = 2 * c.n_layers * b * length * k * c.head_dim
    return (weights + cache) * item


def step_kernels(hlo_text: str, cache_bytes: int) -> dict:
    """Kernels by opcode of the compiled step's entry computation (the decode step has no
    loop), the copies of >= `cache_bytes` (one layer's K cache on a device) anywhere in it,
    and its collectives (a kernel left to XLA's partitioner would gather the cache: those of
    >= cache_bytes are `cache_collectives`)."""
    comps, entry = hlo_cost.parse(hlo_text)
    ops = collections.Counter(op for _, _, op, args in comps[entry] if op not in NOT_KERNELS
                              and 'custom_call_target="ConcatBitcast"' not in args)
    moves = sum(ops.pop(op, 0) for op in ASYNC_MOVES)
    def big(*ops):
        return [_bytes(shape) for comp in comps.values() for _, shape, op, _ in comp
                if op in ops and _bytes(shape) >= cache_bytes]
    # copy-start/-done pairs on a TPU move a buffer between HBM and VMEM (memory-space
    # assignment's prefetches, the S(1) layouts): counted apart from real copies.
    copies, prefetches = big("copy"), big("copy-start")
    started = (*hlo_cost.COLLECTIVES, *(f"{op}-start" for op in hlo_cost.COLLECTIVES))
    collectives = {op: n for comp in comps.values() for op, n in collections.Counter(
        op for _, _, op, _ in comp if op in started).items()}
    return dict(kernels=sum(ops.values()), by_opcode=dict(ops.most_common()), async_moves=moves,
                cache_copies=len(copies), cache_copy_bytes=sum(copies),
                cache_prefetches=len(prefetches), collectives=collectives,
                cache_collectives=len(big(*started)))


def loop_cache_copies(hlo_text: str, cache_bytes: int) -> dict:
    """Copies of >= `cache_bytes` in compiled decode.loop: inside its while body (paid every
    token) and outside it (once per generate call, into and out of the loop's carry)."""
    comps, entry = hlo_cost.parse(hlo_text)
    bodies = [m.group(1) for _, _, op, args in comps[entry] if op == "while"
              for m in [re.search(r"body=%?([\w.\-]+)", args)] if m]
    inside = {c for body in bodies for c in hlo_cost.multiplicities(comps, body)[0]}
    def copies(names):
        return sum(1 for c in names for _, shape, op, _ in comps[c]
                   if op == "copy" and _bytes(shape) >= cache_bytes)
    return dict(loop_body_cache_copies=copies(inside),
                loop_entry_cache_copies=copies(set(comps) - inside))


def _cost_bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("bytes accessed", float("nan")))


def plan_decode(config, target_name: str, batch: int, cache_len: int,
                decode_attention: str = "plain", data: int = 1, tensor: int = 1,
                loop: bool = False) -> dict:
    """One JSON row: the compiled decode step of `config` for a target (a TPU topology such
    as v5e:2x2, or cpu) at `batch` rows over a `cache_len`-slot cache, with the decode
    attention `decode_attention` (plain, ragged_tpu, ragged_gpu), on one device or a (data,
    tensor) mesh of the target's devices (numbers per device). loop: also compile decode.loop
    and count the cache copies inside its body and outside it (loop_cache_copies)."""
    from llama_jax.backends import decode_attention as da  # noqa: PLC0415
    if decode_attention != "plain" and decode_attention not in da.KERNELS:
        raise ValueError(f"unknown decode attention {decode_attention!r}; valid: plain, "
                         f"{', '.join(da.KERNELS)}.")
    if batch % data:
        raise ValueError(f"batch {batch} does not split over data = {data}; choose a batch "
                         f"that is a multiple of --data.")
    if target_name == "cpu":
        devices, dev = jax.devices("cpu"), None
    else:
        target = hardware.parse_target(target_name)
        if target.device.platform != "tpu":
            raise ValueError(f"--target={target_name}: decode steps compile for a TPU topology "
                             f"(e.g. v5e:2x2) or cpu; GPU targets are measured on a GPU "
                             f"(tools/bench_gpu.sh fused).")
        if da.KERNELS.get(decode_attention, "tpu") != "tpu":
            raise ValueError(f"{decode_attention} is a GPU kernel; a TPU target takes plain or "
                             f"ragged_tpu.")
        devices, dev = hardware.tpu_devices(target.topology), target.device
    where = devices[0] if data * tensor == 1 else target_mesh(devices, data, tensor)
    backend = backends.PLAIN
    if decode_attention != "plain":  # interpreted for a cpu target
        backend = backends.Backend(decode_attention=da.make(decode_attention,
                                                            devices[0].platform == "cpu"))
    compiled = compile_step(config, backend, batch, cache_len, where)
    kh = config.n_kv_heads // tensor if config.n_kv_heads % tensor == 0 else config.n_kv_heads
    layer_cache = batch // data * cache_len * kh * config.head_dim * jnp.dtype(
        config.dtype).itemsize
    step = _cost_bytes(compiled)
    roof = roofline_bytes(config, batch, cache_len, data, tensor)
    row = dict(target=target_name, model=config.name, dtype=config.dtype, batch=batch,
               cache_len=cache_len, decode_attention=decode_attention, data=data, tensor=tensor,
               bytes_per_step=step, roofline_bytes=roof, ratio=round(step / roof, 3),
               **step_kernels(compiled.as_text(), layer_cache))
    if loop:
        row.update(loop_cache_copies(compile_step(config, backend, batch, cache_len, where,
                                                  loop=True).as_text(), layer_cache))
    if dev is not None:
        row["hbm_gbs"] = dev.hbm_bw / 1e9
        row["predicted_tokens_s"] = round(batch * dev.hbm_bw / max(step, roof), 1)
    return row
