"""Pipeline stages whose attention is a Pallas kernel: one shard_map manual over every axis.

pipeline.py runs the stages in a shard_map manual over `pipeline` (and `context`) and leaves
data and tensor to XLA inside. A kernel cannot run there: XLA cannot partition its custom
call, Mosaic refuses any automatic axis, and Shardy does not nest the kernel's own shard_map
(backends/sharded.py) inside the pipeline's. So with a kernel the stages are written for
local shards, Megatron-style (Shoeybi et al. 2019), and the kernel is called per device:

- weights enter with their tensor split kept and FSDP's data split gathered (the in_specs
  are sharding.RULES without `data`: gathered once per step before the schedule, as
  pipeline.py's weight_spec does; shard_map's transpose sums their gradients over data);
- rows are split over data, tokens over context (attention.CONTEXT_IMPLS with the kernel as
  `local`);
- column-parallel wq, wk, wv, w_gate, w_up need nothing; row-parallel wo and w_down leave
  partial sums, added over `tensor` by one psum each (Backend.row_sum, model.py);
- GQA with fewer kv heads than tensor ranks: wk, wv are replicated (sharding.RULES) and each
  rank attends with the kv head its query heads share (sharded.device_attention);
- LoRA adapters follow their weight's split (their logical axes), so x·A·B of wo and w_down
  is a partial sum too, added by the same psum.

The schedule is pipeline.py's, with its memory: what is kept between stages (stage inputs,
sends, outputs) holds only this tensor rank's part of T (Megatron's sequence parallelism for
what is stored; here a slice of the stage's output and an all-gather on entry, where
pipeline.py asks XLA for the same with sharding constraints). The psums add the partials in
the compute dtype (bf16 in training, as Megatron's all-reduce does).

check_vma is off (Pallas kernels declare outputs without varying-axis types). Without it,
collectives transpose as sums of per-device contributions: shard_map divides an output's
cotangent over the axes it is replicated on and sums an input's over them, and a psum
transposes to a psum, which together give the true gradients (tests/test_accel_attention.py
checks them against one device).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import attention, pipeline
from llama_jax.backends import sharded


def check(batch: int, microbatches: int, data: int, tokens: int, tensor: int,
          n_heads: int = 0, ffn_dim: int = 0) -> None:
    """One sentence when a microbatch's rows do not split over the data ranks, a rank's
    `tokens`, the query heads or the MLP's hidden units over the tensor ranks, with a kernel
    attention in the stages (sharding.spec would replicate an undivided weight, and the
    row-parallel psum would then add `tensor` copies of its product)."""
    for what, n in (("attention heads", n_heads), ("ffn_dim units", ffn_dim)):
        if n % tensor:
            raise ValueError(f"{n} {what} do not split over tensor = {tensor} with a kernel "
                             f"attention in pipeline stages; choose a tensor size dividing "
                             f"{n} or mesh.attention=chunked.")
    if batch % (microbatches * data):
        raise ValueError(f"batch of {batch} rows does not split into {microbatches} pipeline "
                         f"microbatches x data = {data} with a kernel attention in the stages; "
                         f"make the batch per step a multiple of {microbatches * data}.")
    if tokens % tensor:
        raise ValueError(f"{tokens} tokens per context rank do not split over tensor = "
                         f"{tensor} with a kernel attention in pipeline stages; make "
                         f"data.seq_len a multiple of mesh.context x {tensor}.")


def _store(tensor: int):
    """pipeline._schedule's (park, enter, leave) for T split over `tensor` by hand: what is
    carried arrives sliced (the in_specs), a stage gathers its tokens on entry and keeps its
    rank's slice of its output."""
    def enter(a):  # [B', T/tp, D] -> [B', T, D]
        return jax.lax.all_gather(a, "tensor", axis=1, tiled=True)

    def leave(a):  # [B', T, D] -> this rank's [B', T/tp, D]
        n = a.shape[1] // tensor
        return jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index("tensor") * n, n, axis=1)
    return (lambda a, lead=0: a), enter, leave


def pipeline_layers(model, x, positions, segment_ids, *, mesh, local_attention, weight_spec,
                    microbatches: int = 0, repeats: int = 1, context_impl: str | None = None,
                    axis: str = "pipeline"):
    """pipeline.pipeline_layers for a kernel `local_attention`: x [B, T, D] -> [B, T, D].
    `weight_spec(axes, shape)` is the PartitionSpec of one layer's weight without `data`."""
    c = model.config
    stages, m_count = mesh.shape[axis], microbatches or mesh.shape[axis]
    data, tensor = mesh.shape["data"], mesh.shape["tensor"]
    pipeline.check(c.n_layers, stages, repeats, m_count, x.shape[0])
    cp = "context" if context_impl else None
    check(x.shape[0], m_count, data, x.shape[1] // mesh.shape["context"], tensor, c.n_heads,
          c.ffn_dim)
    sharded.check(c.n_heads, c.n_kv_heads, tensor)
    logging.info("pipeline (manual stages, kernel attention): %d stages x %d repeats, %d "
                 "microbatches, bubble %.3f", stages, repeats, m_count,
                 pipeline.bubble_fraction(stages, repeats, m_count))
    params, axes = pipeline.stage_params(model, stages, repeats)
    leaves, treedef = jax.tree.flatten(params)
    specs = [P(None, axis, None, *weight_spec(ax[1:], a.shape[3:]))  # [R, S, L', ...]
             for a, ax in zip(leaves, axes)]
    attend = functools.partial(sharded.device_attention, local=local_attention,
                               context_impl=context_impl, tensor=tensor,
                               kv_split=c.n_kv_heads % tensor == 0)
    row_sum = functools.partial(jax.lax.psum, axis_name="tensor") if tensor > 1 else None
    ops = dataclasses.replace(model.backend, attention=attend, row_sum=row_sum)
    scatter = m_count % stages == 0

    def stage_fn(leaves, xs, ps, ss):
        outs = pipeline._schedule(c, ops, None, treedef.unflatten(leaves), xs, ps, ss,
                                  stages, repeats, axis, store=_store(tensor))
        return pipeline._fan_out(outs, stages, axis) if scatter else jax.lax.psum(outs, axis)
    # [M, B/M, T, ...]: each microbatch takes B/(M·D) rows of every data rank (pipeline._micro);
    # activations with T over (context, tensor), positions and segment ids over context
    tokens, kept = P(None, "data", cp), P(None, "data", (cp, "tensor") if cp else "tensor")
    micro = functools.partial(pipeline._micro, blocks=data, m_count=m_count)
    out = jax.shard_map(stage_fn, mesh=attention.context_mesh(mesh),
                        in_specs=(specs, kept, tokens, tokens),
                        out_specs=P(axis, *kept[1:]) if scatter else kept,
                        axis_names=set(mesh.axis_names), check_vma=False)(
        leaves, micro(x), micro(positions), micro(segment_ids))
    rows = ("data", axis) if scatter and data > 1 else "data"
    return jax.lax.with_sharding_constraint(pipeline._unmicro(out, data),
                                            NamedSharding(mesh, P(rows, cp, None)))
