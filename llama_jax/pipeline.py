"""Pipeline parallelism: the layer stack split into stages over the `pipeline` mesh axis.

Stage s of S holds L / S layers; a batch is cut into M microbatches that flow stage to stage by
`ppermute`, all inside one `jax.shard_map` (manual over `pipeline` only: the data, context and
tensor axes stay automatic inside each stage). Two schedules share one loop:

- GPipe (Huang et al. 2019), R = 1: stage s holds layers [s·L/S, (s+1)·L/S).
- Circular / interleaved (Narayanan et al. 2021; the "circular pipeline" of praxis and
  MaxText), R > 1: the stack is cut into R·S pieces of L/(R·S) layers and stage s holds pieces
  s, S+s, 2S+s, ...; a microbatch goes round the ring R times.

Work item w = r·M + m (repeat r, microbatch m) is on stage s at loop step t = w + s, so the
loop takes R·M + S − 1 steps of which each stage idles S − 1: the bubble fraction is
(S − 1) / (R·M + S − 1). When the last stage finishes repeat r of microbatch m, its output
rides the same ppermute back to stage 0, which keeps it until step (r+1)·M + m; that needs
M ≥ S. Idle steps compute on placeholders whose results are discarded by `where`, so their
gradients are exactly zero. Autodiff of the loop gives the backward pipeline (reversed
ppermutes); the model's scan and remat settings apply inside each stage, and gradient
accumulation (llama_jax.optim) wraps the whole pipelined step.

Memory (what made Llama 3 405B's layouts fit 80 GB, see the README's plan table): with remat,
each loop step is one checkpoint, so the backward pass keeps one stage input per step, not one
per layer; activations between stages are kept with T split over `tensor` (sequence-parallel
storage); the outputs go into an in-place buffer and leave spread over the stages.

Axis letters: B batch, T length, D model dim, L layers; S stages, R repeats, M microbatches.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import attention
from llama_jax import model as model_lib


def check(n_layers: int, stages: int, repeats: int, microbatches: int, batch: int | None = None):
    """One-sentence errors for a pipeline that cannot be scheduled, before anything compiles."""
    if n_layers % (stages * repeats):
        raise ValueError(f"{n_layers} layers do not split into {stages} pipeline stages x "
                         f"{repeats} repeats; make n_layers a multiple of {stages * repeats}.")
    if microbatches < stages:
        raise ValueError(f"{microbatches} pipeline microbatches are fewer than the {stages} "
                         f"stages; use at least {stages} microbatches.")
    if batch is not None and batch % microbatches:
        raise ValueError(f"batch of {batch} rows does not split into {microbatches} pipeline "
                         f"microbatches; make the batch per step a multiple of it.")


def bubble_fraction(stages: int, repeats: int, microbatches: int) -> float:
    """Idle share of every stage's loop steps: (S − 1) / (R·M + S − 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def _varying(x, axis):
    """Marks a stage-invariant value as per-stage (needed for scan carries under check_vma)."""
    pcast = getattr(jax.lax, "pcast", None)
    return pcast(x, axis, to="varying") if pcast else jax.lax.pvary(x, axis)


def pipeline_layers(model, x, positions, segment_ids, *, mesh, microbatches: int = 0,
                    repeats: int = 1, context_impl: str | None = None,
                    local_attention=None, weight_spec=None,
                    axis: str = "pipeline"):
    """Runs model.layers on x [B, T, D] as an S-stage pipeline; returns [B, T, D].

    A drop-in for the model's own layer loop (model.Parallel.layers, sharding.execution).
    Rows are cut into M microbatches within each data rank's block (`_micro`), so every data
    rank keeps an equal share of every microbatch. With `context_impl`, the shard_map is
    manual over `context` too (tokens split) and attention runs that context-parallel variant
    directly: Shardy does not nest a context shard_map inside the pipeline one.
    `local_attention` (the backend's attention function; default attention's reference) is the
    attention of every stage, or of each rank's gathered keys. When S divides M, the result leaves with its rows split over the
    pipeline stages too (each stage keeps M/S microbatches), so the final norm, the logits and
    the loss after the pipeline run once per row rather than once per stage.

    `weight_spec(axes, shape) -> PartitionSpec` (axes and shape of one layer's weight), when
    given, is where each stage's weights are gathered to once per step (FSDP shards gathered
    over data before the schedule, their gradients reduce-scattered once after it), rather
    than at every use in every step: the Llama 3 paper's FSDP does not reshard the weights
    between the pipeline's microbatches (§3.3.2).
    """
    c = model.config
    stages, m_count = mesh.shape[axis], microbatches or mesh.shape[axis]
    check(c.n_layers, stages, repeats, m_count, x.shape[0])
    logging.info("pipeline: %d stages x %d repeats, %d microbatches, bubble %.3f", stages,
                 repeats, m_count, bubble_fraction(stages, repeats, m_count))
    params, axes = stage_params(model, stages, repeats)
    blocks = mesh.shape["data"] if x.shape[0] % (mesh.shape["data"] * m_count) == 0 else 1
    micro = functools.partial(_micro, blocks=blocks, m_count=m_count)
    scatter = m_count % stages == 0
    cp = "context" if context_impl else None
    # Rows over data in and out, and at every block boundary inside the stages: left to
    # itself, XLA shards D of the activations over data like the FSDP weights and keeps
    # every row on every device (the same trap as sharding.hooks' activation constraint).
    # Between stages (inputs, sends, saved stage inputs, outputs) T is also split over
    # `tensor` (Megatron's sequence parallelism, Korthikanti et al. 2022, for what is kept).
    rows_out = ("data", axis) if scatter and blocks > 1 else "data"
    parked = NamedSharding(mesh, P("data", (cp, "tensor") if cp else "tensor", None))
    x = jax.lax.with_sharding_constraint(x, parked)

    local = local_attention or attention.reference_attention
    attn = (functools.partial(attention.CONTEXT_IMPLS[context_impl], axis=cp, local=local)
            if cp else local)
    ops = dataclasses.replace(model.backend, attention=attn)  # in the stage: no shard_map

    def gather(a, ax):  # a [R, 1, L', ...]: the spec of the [...] part
        return jax.lax.with_sharding_constraint(
            a, P(None, None, None, *weight_spec(ax[1:], a.shape[3:])))

    def stage_fn(params, xs, ps, ss):
        if weight_spec is not None:
            leaves, treedef = jax.tree.flatten(params)
            params = treedef.unflatten([gather(a, ax) for a, ax in zip(leaves, axes)])
        rows = lambda a: jax.lax.with_sharding_constraint(a, P("data"))  # noqa: E731 - [B/M, ..]
        outs = _schedule(model.config, ops, rows, params, xs, ps, ss, stages, repeats, axis)
        return _fan_out(outs, stages, axis) if scatter else jax.lax.psum(outs, axis)
    tokens = P(None, None, cp)  # [M, B/M, T, ...]
    out = jax.shard_map(stage_fn, mesh=attention.context_mesh(mesh),
                        in_specs=(P(None, axis), tokens, tokens, tokens),
                        out_specs=P(axis, None, cp) if scatter else tokens,
                        axis_names={axis, cp} - {None})(
        params, micro(x), micro(positions), micro(segment_ids))
    out = _unmicro(out, blocks)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(rows_out, cp, None)))


def stage_params(model, stages: int, repeats: int):
    """(model.layers' state with leaves [R, S, L/(R·S), ...], the logical axes of each leaf in
    the order of jax.tree.leaves): layer (r·S + s)·L/(R·S) + j is [r, s, j]; stage s keeps
    [:, s]."""
    per_piece = model.config.n_layers // (stages * repeats)
    state = nnx.state(model.layers)  # leaves [L, ...]
    params = jax.tree.map(lambda a: a.reshape(repeats, stages, per_piece, *a.shape[1:]), state)
    axes = [v.axes for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))]
    return params, axes


def _micro(a, *, blocks, m_count):
    """[B, ...] -> [M, B/M, ...]: row (d·M + m)·B/(D·M) + j goes to microbatch m, D = `blocks`
    contiguous row blocks (the data ranks' shards): each microbatch takes an equal contiguous
    slice of every data rank's rows, so the reshapes move nothing between devices."""
    b = a.shape[0]
    a = a.reshape(blocks, m_count, b // (blocks * m_count), *a.shape[1:]).swapaxes(0, 1)
    return a.reshape(m_count, b // m_count, *a.shape[3:])


def _unmicro(a, blocks):
    """The inverse of _micro: [M, B/M, ...] -> [B, ...]. With M split over the pipeline
    stages, the rows come out split over (data, pipeline) in this order, contiguously."""
    m_count, rows = a.shape[:2]
    a = a.reshape(m_count, blocks, rows // blocks, *a.shape[2:]).swapaxes(0, 1)
    return a.reshape(m_count * rows, *a.shape[3:])


def _fan_out(outs, stages, axis):
    """The last stage's outs [M, ...] -> chunk s [M/S, ...] on stage s, by S − 1 ppermutes
    from the last stage (a psum_scatter over the partly manual mesh gathers the auto-sharded
    rows first: M·B/M·T·D per device)."""
    chunks = outs.reshape(stages, outs.shape[0] // stages, *outs.shape[1:])
    s = jax.lax.axis_index(axis)
    mine = chunks[stages - 1]
    for j in range(stages - 1):
        got = jax.lax.ppermute(chunks[j], axis, [(stages - 1, j)])
        mine = jnp.where(s == j, got, mine)
    return mine


def _park(a, lead=0):
    """[(lead dims), B', T, D] with rows over data and T over tensor (auto axes in shard_map)."""
    return jax.lax.with_sharding_constraint(a, P(*(None,) * lead, "data", "tensor"))


def _schedule(c, ops, constrain, params, xs, ps, ss, stages, repeats, axis, store=None):
    """The per-stage loop (inside shard_map). xs [M, B/M, T, D]; params leaves [R, 1, L', ...].
    Returns [M, B/M, T, D]: the last stage's outputs, zeros on the other stages. `constrain`
    places rows at block boundaries; `store` = (park, enter, leave) is how activations are
    kept between stages: park(a) holds what is carried in its kept layout, enter(a) makes a
    kept activation the stage's input, leave(a) the stage's output a kept one. Default:
    sharding constraints (T over tensor, gathered on entry); pipeline_manual.py slices T.

    Only what the next step needs is carried: the activation from the previous stage, the
    output buffer (written in place, one microbatch per step on the last stage) and, for
    R > 1, stage 0's returning microbatches. With remat, each step's stage is one checkpoint:
    the backward pass keeps only the stage's input per step (not every layer's) and recomputes
    the stage, inside which the model's own per-layer remat applies again.
    """
    park, enter, leave = store or (_park, constrain, _park)
    m_count, s = xs.shape[0], jax.lax.axis_index(axis)
    items = repeats * m_count
    params = jax.tree.map(lambda a: a[:, 0], params)  # [R, L/(R·S), ...]
    ring = [(i, (i + 1) % stages) for i in range(stages)]
    xs = park(xs, lead=1)
    zeros = _varying(jnp.zeros_like(xs), axis)

    def stage(x_in, pos, seg, r, params):  # params whole: a slice by r would be saved per step
        layers = jax.tree.map(lambda a: a[r], params)
        x = enter(x_in)  # gathers T over tensor
        return leave(model_lib.forward_layers(c, ops, layers, x, pos, seg,
                                              constrain=constrain)[0])
    if c.remat != "none":
        stage = jax.checkpoint(stage, policy=jax.checkpoint_policies.nothing_saveable)

    def step(carry, t):
        held, loop, outs = carry  # held: what the previous stage sent; loop: stage 0's returns
        w = jnp.clip(t - s, 0, items - 1)  # work item; out of range = idle (result unused)
        r, m = w // m_count, w % m_count
        first = xs[m] if loop is None else jnp.where(r == 0, xs[m], loop[m])
        x_in = park(jnp.where(s == 0, first, held))  # the only activation kept per step
        y = stage(x_in, ps[m], ss[m], r, params)
        sent = jax.lax.ppermute(y, axis, ring)
        # the last stage finishes microbatch m of the last repeat at step (R − 1)·M + m + S − 1
        done = (s == stages - 1) & (t - s >= (repeats - 1) * m_count) & (t - s < items)
        outs = outs.at[m].set(jnp.where(done, y, outs[m]))
        if loop is not None:  # stage 0 now holds item t − (S − 1): keep it for its next repeat
            back = t - (stages - 1)
            m_back = jnp.clip(back, 0, items - 1) % m_count
            keep = (s == 0) & (back >= 0) & (back < items)
            loop = loop.at[m_back].set(jnp.where(keep, sent, loop[m_back]))
        return (sent, loop, outs), None

    carry = (zeros[0], zeros if repeats > 1 else None, zeros)
    (_, _, outs), _ = jax.lax.scan(step, carry, jnp.arange(items + stages - 1))
    return outs
