"""tools/plan.py and llama_jax.plan: ahead-of-time plans against what the compiled step does.

The memory check runs the planned step for real on the 8 simulated CPU devices. CPU devices
report no allocator statistics (`device.memory_stats()` is None), so "what the step actually
allocates" is measured as: the bytes of every live array on device 0 after one step (state,
metrics and batch: the runtime's own buffers, read from the arrays) plus the temp buffer of
the executable that ran, which XLA allocates whole for each execution.
"""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import backends, flops, hardware, hlo_cost, optim, plan, plan_search, sharding, train
from llama_jax import model as model_lib
from llama_jax.config import ModelConfig

TINY = "experiments/configs/tiny.py:test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_libtpu() -> bool:
    """libtpu comes with the `plan` extra only; TPU targets cannot be compiled without it."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(
    not _have_libtpu(), reason="libtpu is not installed; TPU targets need the plan extra "
    "(pip install -e '.[plan]')")


def test_libtpu_guard_sees_a_missing_libtpu(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    assert not _have_libtpu()


def _tiny(*overrides):
    return plan.load_config(os.path.join(ROOT, TINY), list(overrides))


@pytest.fixture(scope="module")
def tiny_plan():
    # data 4 x tensor 2; T 32 keeps the causal-attention share small (the compiler computes the
    # whole T x S score matrix, the analytic count only its causal half).
    config = _tiny("--config.mesh.data=4", "--config.mesh.tensor=2", "--config.data.seq_len=32",
                   "--config.data.global_batch=16")
    return config, plan.plan(config, "cpu:8")


def _bytes_on(tree, device) -> int:
    """Bytes of the tree's shards that live on `device` (what the step's buffers hold there).

    Only the step's own arrays count: jax.live_arrays() would also see whatever earlier tests
    in the same process keep alive."""
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
               if s.device == device)


def test_plan_bytes_match_a_real_step(tiny_plan):
    config, report = tiny_plan
    mc = sharding.from_config(config.mesh)
    mesh = sharding.make_mesh(mc)
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    # the model as the plan compiles it: the plain backend, run as execution() says
    model = model_lib.create(mcfg, 0, *sharding.execution(mesh, mc, backends.PLAIN))
    graphdef, params = nnx.split(model, nnx.Param)
    axes = model_lib.logical_axes(model)
    ocfg = train.optim_config(config)
    tx = optim.make_optimizer(ocfg, axes)
    state = sharding.init_sharded(lambda: train.init_state(nnx.to_pure_dict(params), tx),
                                  mesh, mc, axes)
    s = train.Step(graphdef, tx, optim.make_schedule(ocfg))
    step = sharding.jit_step(lambda st, b: train.train_step(st, b, s), mesh, mc, state, axes)
    rows, t = config.data.global_batch, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (rows, t), dtype=np.int32)
    host = dict(inputs=tokens, targets=tokens, positions=np.tile(np.arange(t, dtype=np.int32),
                (rows, 1)), segment_ids=np.ones_like(tokens), loss_mask=np.ones_like(tokens))
    del model, params
    with jax.set_mesh(mesh):
        batch = sharding.shard_batch(host, mesh)
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    dev0 = mesh.devices.flat[0]
    measured_params = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(
        state.params))
    measured_opt = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(
        state.opt_state))
    mem = report["memory"]
    assert mem["params"] == pytest.approx(measured_params, rel=0.10)
    assert mem["optimizer"] == pytest.approx(measured_opt, rel=0.10)
    actual = _bytes_on((state, batch, metrics), dev0) + temp  # donated: outputs alias inputs
    assert mem["total"] == pytest.approx(actual, rel=0.10), (mem, actual)
    assert report["fits"] and np.isfinite(float(metrics["loss"]))


def test_hlo_flops_count_loop_trips_that_cost_analysis_counts_once():
    """A scan of L matmuls: XLA's cost analysis sees one, the HLO walker all L."""
    L, B, D = 6, 16, 128

    def f(w, x):
        return jax.lax.scan(lambda h, wl: (h @ wl, None), x, w)[0]
    compiled = jax.jit(f).lower(jnp.ones((L, D, D)), jnp.ones((B, D))).compile()
    cost = hlo_cost.analyse(compiled.as_text())
    assert cost.flops == pytest.approx(2 * B * D * D * L)
    assert compiled.cost_analysis()["flops"] < cost.flops / 2


def test_hlo_flops_of_a_padded_convolution_count_real_taps_only():
    """A window-3 convolution padded 1 on each side of 8 positions reads 8 x 3 - 2 real
    inputs; XLA:TPU writes projections as size-32 windows padded 31 on each side (one real
    tap per output), where counting every window position overcounts 32 times."""
    b, n, i, o, w = 2, 8, 4, 5, 3
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"))
    compiled = jax.jit(conv).lower(jnp.ones((b, n, i)), jnp.ones((w, i, o))).compile()
    assert hlo_cost.analyse(compiled.as_text()).flops == 2 * b * o * i * (n * w - 2)
    tpu_line = ("  %x = bf16[1024,4096,1]{1,0,2} parameter(0)\n"
                "  %k = bf16[1024,32,128]{0,2,1} parameter(1)\n"
                "  ROOT %c = f32[4096,32,128]{2,0,1} convolution(%x, %k), window={size=32 "
                "pad=31_31 rhs_reversal=1}, dim_labels=fb0_i0o->b0f\n")
    text = "ENTRY %main (x: bf16[1024,4096,1], k: bf16[1024,32,128]) -> f32[4096,32,128] {\n"
    assert hlo_cost.analyse(text + tpu_line + "}\n").flops == 2 * 4096 * 32 * 128 * 1024


def test_analytic_flops_match_compiler_cost_analysis_on_tiny(tiny_plan):
    """The compiler's matmul FLOPs within 5% of flops.py, scanned and unrolled alike.

    Unrolled, XLA's own cost analysis sees every layer; it also counts elementwise work
    (norms, RoPE, softmax, AdamW), about 7% at the tiny model's D = 64 and well under 1% at
    real widths, so it is checked against the matmul count it contains, not the 5% bound.
    """
    config, report = tiny_plan
    unrolled = _tiny("--config.mesh.data=8", "--config.data.seq_len=32",
                     "--config.data.global_batch=16", "--config.model.scan_layers=false")
    r = plan.plan(unrolled, "cpu:8")
    assert r["flops"]["compiler"] == pytest.approx(r["flops"]["analytic"], rel=0.05)
    assert r["flops"]["compiler"] < r["flops"]["xla_cost_analysis"] < 1.1 * r["flops"]["compiler"]
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    per_device = flops.train_flops_per_token(mcfg, 32) * 16 * 32 / 8
    assert report["flops"]["analytic"] == pytest.approx(per_device)


def test_report_has_roofline_and_json_cli(tiny_plan, capsys):
    _, report = tiny_plan
    rl = report["roofline"]
    assert rl["step_s"] == max(rl["compute_s"], rl["hbm_s"], rl["comm_s"]) > 0
    assert 0 < rl["mfu"] < 1 and report["collectives"]  # tensor 2 needs all-reduces
    main = _cli()
    assert main([f"--config={os.path.join(ROOT, TINY)}", "--target=cpu:8", "--format=json",
                 "--config.mesh.data=8", "--config.data.seq_len=32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"]["data"] == 8 and out["fits"] and out["memory"]["total"] > 0


@needs_libtpu
def test_tiny_plans_on_a_tpu_topology():
    """The TPU compiler itself (libtpu, no TPU attached) on a 2x4 v5e slice."""
    r = plan.plan(_tiny("--config.data.global_batch=16"), "v5e:2x4")
    assert r["device"] == "TPU v5e" and r["devices"] == 8 and not r["estimate"]
    assert r["fits"] and r["memory"]["capacity"] == hardware.DEVICES["v5e"].hbm_bytes
    assert r["flops"]["compiler"] >= r["flops"]["analytic"] > 0 and r["roofline"]["step_s"] > 0


@needs_libtpu
def test_pipelined_plan_compiles_splash_in_the_stages():
    """Mosaic compiles the splash kernel inside pipeline stages (llama_jax/pipeline_manual.py:
    every mesh axis manual there), and the plan says it planned splash."""
    r = plan.plan(_tiny("--config.mesh.data=2", "--config.mesh.pipeline=2",
                        "--config.mesh.tensor=2", "--config.data.global_batch=16"), "v5e:2x4")
    assert r["attention"] == "splash" and r["mesh"]["pipeline"] == 2 and not r["estimate"]
    assert r["fits"] and r["roofline"]["step_s"] > 0


# ----------------------------------------------------------------------------------------------
# GPU targets: the Pallas GPU kernel as one opaque call each way (backends/gpu.py planned_mha).


def test_gpu_kernel_stand_in_is_one_call_each_way_with_the_kernels_io():
    """hlo_cost sees the stand-in as the compiled kernel: one forward and one backward call,
    their inputs and outputs counted once (q, k, v, segment ids -> out, lse; then q, k, v,
    segment ids, dout, lse, delta -> dq, dk, dv), plus the preprocess pass (out, dout ->
    delta); the interpreted kernel moves over 100x that at T = 1,024."""
    from llama_jax.backends import gpu
    b, t, n, h = 1, 1024, 2, 64
    x, seg = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, t), jnp.int32))
    vjp = lambda q, k, v, s, do: jax.vjp(gpu.planned_mha, q, k, v, s)[1](do)[:3]  # noqa: E731
    cost = hlo_cost.analyse(jax.jit(vjp).lower(x, x, x, seg, x).compile().as_text())
    names = [name.rsplit("/", 2)[-2] for name, *_ in cost.custom_calls]
    assert sorted(names) == ["jvp(pallas_gpu_fwd)", "transpose(jvp(pallas_gpu_bwd))"]
    a, lse, s = b * t * n * h * 2, b * n * t * 4, b * t * 4  # bytes of a bf16 [B,T,N,H] etc.
    fwd, pre, bwd = (3 * a + s) + (a + lse), 2 * a + lse, (4 * a + s + 2 * lse) + 3 * a
    assert cost.hbm_bytes == pytest.approx(fwd + pre + bwd, rel=0.01)  # XLA:CPU: delta's
    # transpose to [B, N, T] is a fusion of its own (0.5% here)

    def loss(q, k, v, s, planned):
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        return gpu.flash_attention(q, k, v, pos, s, planned=planned,
                                   interpret=True).astype(jnp.float32).sum()
    costs = [hlo_cost.analyse(jax.jit(jax.grad(functools.partial(loss, planned=p), (0, 1, 2)))
                              .lower(x, x, x, seg).compile().as_text()) for p in (True, False)]
    assert costs[1].hbm_bytes > 100 * costs[0].hbm_bytes
    assert costs[0].flops == 0 and costs[1].unknown_loops  # the kernel's work: kernel_flops


@pytest.mark.slow  # 10-13 s: a plan compiled in a subprocess
def test_gpu_plan_costs_the_kernel_calls():
    """A GPU target plans pallas_gpu: each forward (twice per layer under remat=full) and
    backward call adds the FLOPs of the tiles its causal mask visits, per row and head
    2H x T(T + b)/2 per product: 2 products forward at b = 128, 4 + 3 backward at b = 64."""
    t, layers = 1024, 2
    r = plan.plan(_tiny("--config.mesh.data=8", f"--config.data.seq_len={t}",
                        "--config.data.global_batch=8", "--config.model.remat=full"), "h100:8")
    mcfg = ModelConfig.from_dict(_tiny().model.to_dict())
    rows_heads, h = 1 * mcfg.n_heads, mcfg.head_dim  # 1 row of 2 heads per device
    fwd = 2 * 2 * h * rows_heads * t * (t + 128) / 2
    bwd = 7 * 2 * h * rows_heads * t * (t + 64) / 2
    f = r["flops"]
    assert r["attention"] == "pallas_gpu" and r["estimate"] and not f["uncounted"]
    assert f["kernel"] == pytest.approx(layers * (2 * fwd + bwd), rel=1e-9)
    assert r["roofline"]["mfu"] < f["analytic"] / f["compiler"] < 1


def _cli():
    spec = importlib.util.spec_from_file_location("plan_cli", os.path.join(ROOT, "tools/plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, before compiling.


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match="valid targets: .*v5p.*h100:N"):
        plan.plan(_tiny(), "v7x:2x2")


def test_mesh_not_matching_target_says_so():
    with pytest.raises(ValueError, match="needs 16 devices but there are 8"):
        plan.plan(_tiny("--config.mesh.data=8", "--config.mesh.tensor=2"), "h100:8")


def test_missing_libtpu_says_how_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(RuntimeError, match=r'pip install "jax\[tpu\]=='):
        hardware.parse_target("v5e:2x2")


def test_cli_reports_bad_input_without_traceback(capsys):
    assert _cli()([f"--config={os.path.join(ROOT, TINY)}", "--target=tpu9"]) == 2
    assert "Unknown target 'tpu9'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Full-size models on TPU topologies (libtpu) and GPU nodes (simulated CPU devices). Each is a
# compile of the real step (scan_layers: O(1) in depth), 20 s to a few minutes on two cores.

FULL_SIZE = [
    ("llama3_8b.py", "v5p:4x4x4", []),
    ("llama3_8b.py", "h100:8", []),
    ("llama3_70b.py", "v5p:4x4x4", ["--config.mesh.tensor=4"]),
    ("llama3_70b.py", "h100:64", ["--config.mesh.tensor=8"]),
    ("llama3_405b.py", "v5p:8x8x8", ["--config.mesh.tensor=8"]),
    ("llama3_405b.py", "h100:1024", ["--config.mesh.tensor=8"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,target,overrides", [
    pytest.param(n, t, o, id=f"{n[:-3]}-{t}", marks=[needs_libtpu] if t.startswith("v") else [])
    for n, t, o in FULL_SIZE])
def test_full_size_models_plan(name, target, overrides):
    config = plan.load_config(os.path.join(ROOT, "experiments/configs", name), overrides
                              + ["--config.data.global_batch=512"])
    r = plan.plan(config, target)
    mem = r["memory"]
    n_devices = r["devices"]
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    n_params = model_lib.param_count(model_lib.abstract(mcfg))
    # f32 parameters sharded over every device of the mesh (FSDP x tensor), AdamW twice that
    assert mem["params"] == pytest.approx(4 * n_params / n_devices, rel=0.05)
    assert mem["optimizer"] == pytest.approx(2 * mem["params"], rel=0.01)
    assert mem["total"] > mem["params"] + mem["optimizer"] and mem["temporaries"] > 0
    assert r["fits"] == (mem["total"] <= mem["capacity"]) and (r["fits"] or r["reason"])
    assert r["estimate"] == target.startswith("h100")
    if "roofline" in r:  # XLA:TPU refuses to compile what exceeds HBM: no program to time
        # remat=full recomputes the forward pass: 4 passes of the model where 3 are counted
        assert 1.0 < r["flops"]["compiler"] / r["flops"]["analytic"] < 1.6
        assert 0 < r["roofline"]["mfu"] < 1
    else:
        assert "ran out of device memory" in r["reason"]


@pytest.mark.slow
def test_405b_unsharded_on_8_gpus_does_not_fit():
    config = plan.load_config(os.path.join(ROOT, "experiments/configs/llama3_405b.py"),
                              ["--config.mesh.fsdp=false", "--config.data.global_batch=8"])
    r = plan.plan(config, "h100:8")
    assert not r["fits"]
    assert "needs" in r["reason"] and "GiB per device" in r["reason"]
    assert r["memory"]["params"] > 1.5e12  # 405B float32 weights, whole on every device


@pytest.mark.slow
def test_search_ranks_fitting_layouts_by_mfu():
    config = _tiny("--config.data.global_batch=16")
    results = plan_search.search(config, "cpu:8", max_compiles=3)
    assert len(results) == 3 and all(r["fits"] for r in results)
    mfus = [r["roofline"]["mfu"] for r in results]
    assert mfus == sorted(mfus, reverse=True)
    assert len({json.dumps(r["mesh"]) + r["remat"] for r in results}) == 3
    assert len(plan_search.format_ranking(results).splitlines()) == 4


@pytest.mark.parametrize("name,devices", [("plan_llama3_405b_paper.py", 8192),
                                          ("plan_llama3_405b_128k.py", 16384),
                                          ("plan_llama1_65b.py", 2048)])
def test_recipe_layouts_fill_their_clusters(name, devices):
    """The recipes' meshes use exactly the paper's GPU counts and pass the sharding checks."""
    config = plan.load_config(os.path.join(ROOT, "experiments/configs", name))
    mc = sharding.from_config(config.mesh)
    assert np.prod(sharding.mesh_shape(mc, devices)) == devices
    mesh = jax.sharding.AbstractMesh(sharding.mesh_shape(mc, devices), sharding.AXES)
    sharding.check(mc, mesh, ModelConfig.from_dict(config.model.to_dict()),
                   config.data.seq_len, config.data.global_batch)


@pytest.mark.parametrize("name,target,stand_in,batch,layers", [
    ("plan_llama3_405b_paper.py", "h100:8192", (16, 16, 1, 8), 512, 128),  # data 64 -> 16
    ("plan_llama3_405b_128k.py", "h100:16384", (8, 2, 16, 8), 128, 16),    # stages 16 -> 2
])
def test_stand_in_mesh_keeps_rows_and_shards_per_device(name, target, stand_in, batch, layers):
    """Over 2,048 devices the stand-in shrinks data while it keeps 8 ranks, then the stages
    with the layer stack: rows per data rank and layers per stage stay the target's."""
    config = plan.load_config(os.path.join(ROOT, "experiments/configs", name))
    n, full, (kd, kp) = plan._simulated_mesh(config, hardware.parse_target(target))
    assert n == 2048 and (config.mesh.data, config.mesh.pipeline) == stand_in[:2]
    assert (config.data.global_batch, config.model.n_layers) == (batch, layers)
    assert config.data.global_batch // config.mesh.data == batch * kd // full[0]
    assert config.model.n_layers // config.mesh.pipeline == layers * kp // full[1]
