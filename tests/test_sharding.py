"""Mesh, rules and the sharded train step: every layout of 8 devices equals one device."""

import itertools
import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from llama_jax import model, sharding
from mesh_setup import CFG, make_step, reference, rel, run_sharded, step_fn
from mesh_setup import fast_compiles  # noqa: F401 - autouse fixture

MC = sharding.MeshConfig

# Every (data, pipeline, context, tensor) with product 8: 20 layouts. The default run covers
# FSDP and tensor alone and every axis mixed with others; the rest (and the ring variant, also
# tested against unsharded attention in test_context.py) are marked slow.
ALL = [s for s in itertools.product([1, 2, 4, 8], repeat=4) if math.prod(s) == 8]
DEFAULT = [(8, 1, 1, 1), (1, 1, 1, 8), (2, 2, 2, 1), (1, 2, 2, 2)]
LAYOUTS = ([pytest.param(MC(*s), id="x".join(map(str, s))) for s in DEFAULT] +
           [pytest.param(MC(2, 1, 4, 1, context_impl="ring"), id="2x1x4x1-ring",
                         marks=pytest.mark.slow)] +
           [pytest.param(MC(*s), id="x".join(map(str, s)), marks=pytest.mark.slow)
            for s in ALL if s not in DEFAULT])


def test_mesh_fills_minus_one_and_rejects_a_wrong_product():
    assert sharding.mesh_shape(MC(data=-1, tensor=2), 8) == (4, 1, 1, 2)
    assert sharding.mesh_shape(MC(data=2, pipeline=2, context=-1, tensor=1), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="needs 12 devices but there are 8"):
        sharding.make_mesh(MC(data=3, tensor=4))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape(MC(data=-1, tensor=-1), 8)


def test_usage_in_the_docstring_calls_the_real_signatures():
    """Every call of a sharding function in the module docstring's example binds to the
    function's signature (right count and names of arguments); `model.` calls too."""
    import ast
    import inspect
    import textwrap

    example = textwrap.dedent(sharding.__doc__.split("\n\n")[1])
    calls = [n for n in ast.walk(ast.parse(example)) if isinstance(n, ast.Call)]
    checked = set()
    for call in calls:
        f = call.func
        if isinstance(f, ast.Name) and hasattr(sharding, f.id):
            fn, name = getattr(sharding, f.id), f.id
        elif isinstance(f, ast.Attribute) and ast.unparse(f.value) == "model":
            fn, name = getattr(model, f.attr), f"model.{f.attr}"
        else:
            continue
        inspect.signature(fn).bind(*call.args, **{k.arg: k.value for k in call.keywords})
        checked.add(name)
    assert {"make_mesh", "check", "init_sharded", "jit_step", "shard_batch"} <= checked


def test_tensor_axis_is_innermost():
    mesh = sharding.make_mesh(MC(data=2, pipeline=1, context=2, tensor=2))
    assert mesh.axis_names == sharding.AXES
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 4
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # tensor groups are neighbouring devices; data is the outermost (slowest) axis
    assert (np.diff(ids, axis=-1) == 1).all()
    assert (ids[1] - ids[0] == 4).all()


def test_rules_place_fsdp_tensor_and_pipeline():
    mesh = sharding.make_mesh(MC(data=2, pipeline=2, context=1, tensor=2))
    wq = ("layers", "embed", "q_heads", "head_dim")
    assert sharding.spec(wq, (8, 32, 8, 4), mesh) == P("pipeline", "data", "tensor", None)
    assert sharding.spec(wq, (8, 32, 8, 4), mesh, fsdp=False) == P("pipeline", None, "tensor",
                                                                      None)
    assert sharding.spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "data")
    assert sharding.spec(("vocab", "embed"), (259, 32), mesh) == P(None, "data")  # 259 % 2
    wide = sharding.make_mesh(MC(data=1, pipeline=1, context=2, tensor=4))
    wk = ("layers", "embed", "kv_heads", "head_dim")
    assert sharding.spec(wk, (8, 32, 2, 4), wide) == P(None, None, None, None)  # K 2 < 4


def test_optimizer_state_follows_its_parameter():
    s, state, params = make_step()
    mesh = sharding.make_mesh(MC(data=4, pipeline=1, context=1, tensor=2))
    shard = sharding.state_shardings(state, params, mesh)
    wd = shard.params["layers"]["mlp"]["w_down"].spec
    assert wd == P(None, "tensor", "data")
    adam = [x for x in jax.tree.leaves(shard.opt_state) if x.spec == wd]
    assert len(adam) == 2  # mu and nu
    assert shard.step.spec == P()


def test_sharded_init_matches_and_is_sharded():
    mc = MC(data=4, pipeline=1, context=1, tensor=2)
    mesh = sharding.make_mesh(mc)
    init = lambda: nnx.to_pure_dict(nnx.state(model.create(CFG, 0), nnx.Param))  # noqa: E731
    got = sharding.init_sharded(init, mesh, mc, model.logical_axes(model.abstract(CFG)))
    assert rel(got, make_step()[1].params) <= 1e-6  # compiled vs eager normal sampling
    wq = got["layers"]["attn"]["wq"]
    assert wq.addressable_shards[0].data.shape == (8, 32 // 4, 8 // 2, 4)


@pytest.mark.parametrize("config, mc, seq, batch, message", [
    (CFG, MC(data=1, tensor=8), 16, 16, None),
    (CFG.replace(n_heads=4, n_kv_heads=2), MC(data=1, tensor=8), 16, 16,
     "4 attention heads are not divisible by tensor = 8"),
    (CFG, MC(data=2, context=4), 12, 16, "sequence length 12 is not divisible by 2 x context"),
    (CFG.replace(n_layers=6), MC(data=2, pipeline=4), 16, 16,
     "6 layers do not split into 4 pipeline stages x 1 repeats"),
    (CFG, MC(data=2, pipeline=4, repeats=4), 16, 16, "8 layers do not split into 4 pipeline"),
    (CFG, MC(data=2, pipeline=4, pipeline_microbatches=2), 16, 16,
     "2 pipeline microbatches are fewer than the 4 stages"),
    (CFG, MC(data=8), 16, 12, "batch of 12 rows does not split over data = 8"),
])
def test_bad_layouts_fail_before_compiling(config, mc, seq, batch, message):
    mesh = sharding.make_mesh(mc)
    if message is None:
        sharding.check(mc, mesh, config, seq, batch)
        return
    with pytest.raises(ValueError, match=message):
        sharding.check(mc, mesh, config, seq, batch)


# ----------------------------------------------------------------------------------------------
# Equivalence with the single-device step.


@pytest.mark.parametrize("mc", LAYOUTS)
def test_train_step_equals_single_device(mc):
    ref_losses, ref_params = reference()
    losses, params, state = run_sharded(mc)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert rel(params[0], ref_params[0]) <= 1e-5
    assert rel(params[2], ref_params[2]) <= 1e-5
    assert rel(ref_params[2], ref_params[0]) > 1e-3  # the steps did move the parameters
    assert int(state.step) == 3 and int(state.skipped) == 0


# ----------------------------------------------------------------------------------------------
# Memory, read from the compiled step (XLA's buffer assignment), not from wall time.


def compiled_memory(mc, n_devices, b=16, t=16):
    """memory_analysis() of the sharded train step compiled for the first n_devices."""
    s, state, params = make_step()
    mesh = sharding.make_mesh(mc, jax.devices()[:n_devices])
    step = sharding.jit_step(step_fn(s, mesh, mc), mesh, mc, state, params)
    keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    batch = {k: jax.ShapeDtypeStruct((b, t), np.int32) for k in keys}
    with jax.set_mesh(mesh):
        return step.lower(state, batch).compile().memory_analysis()


@pytest.mark.slow
def test_parameter_and_optimizer_bytes_fall_as_one_over_fsdp_degree():
    # arguments = parameters + AdamW's mu, nu + the batch, all sharded over data; only the
    # RMSNorm gains and a few scalars stay whole on every device
    one = compiled_memory(MC(1, 1, 1, 1), 1).argument_size_in_bytes
    for n in (2, 8):
        per_device = compiled_memory(MC(n, 1, 1, 1), n).argument_size_in_bytes
        assert one / n <= per_device <= 1.1 * one / n, (n, one, per_device)
    replicated = compiled_memory(MC(8, 1, 1, 1, fsdp=False), 8).argument_size_in_bytes
    assert replicated > 0.95 * one  # the replication switch keeps whole copies


@pytest.mark.slow
def test_activation_bytes_fall_with_context_degree():
    temp = {c: compiled_memory(MC(1, 1, c, 1), c, b=4, t=128).temp_size_in_bytes
            for c in (1, 2, 4)}
    assert temp[2] < 0.6 * temp[1] and temp[4] < 0.6 * temp[2], temp
