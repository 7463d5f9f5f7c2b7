"""llama_jax.hlo_loops and hlo_cost's loop weighting: FLOPs counted from compiled HLO text
equal the analytic count of tiny programs whose loops run a known number of times.

The programs compile for the CPU (XLA:CPU annotates known_trip_count; the same text without
the annotation checks the derivation from counter, bound and step) and for a TPU topology
(libtpu, no TPU attached; XLA:TPU prints no annotation at all). The planner on a small
scanned, rematerialised model compiled for TPU v5p: compiler FLOPs within the stated factor of
flops.py and a predicted MFU below 100%.
"""

import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from llama_jax import flops, hardware, hlo_cost, hlo_loops, plan
from llama_jax.backends import tpu
from llama_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, B, D = 6, 16, 128
MATMUL = 2 * B * D * D


def _scan(w, x):  # L iterations
    return jax.lax.scan(lambda h, wl: (h @ wl, None), x, w)[0]


def _fori(w, x):  # from 2 to 11: 9 iterations (a count from the bound alone says 11)
    return jax.lax.fori_loop(2, 11, lambda i, h: h @ w[i % L], x)


def _while(w, x):  # i = 0, 3, 6, 9: 4 iterations (the bound alone says 10)
    return jax.lax.while_loop(lambda c: c[0] < 10,
                              lambda c: (c[0] + 3, c[1] @ w[c[0] % L]), (0, x))[1]


def _nested(w, x):  # 3 x L iterations
    return jax.lax.fori_loop(0, 3, lambda _, h: _scan(w, h), x)


def _countdown(w, x):  # i = 9, 7, 5, 3, 1: 5 iterations (XLA writes add(i, -2), 0 < i)
    return jax.lax.while_loop(lambda c: c[0] > 0,
                              lambda c: (c[0] - 2, c[1] @ w[c[0] % L]), (9, x))[1]


PROGRAMS = [(_scan, L), (_fori, 9), (_while, 4), (_nested, 3 * L), (_countdown, 5)]


def _have_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not _have_libtpu(), reason="libtpu is not installed (the "
                                  "plan extra); TPU compiles need it, CI does not install it")


def _hlo(f, device=None) -> str:
    sharding = SingleDeviceSharding(device) if device else None
    args = [jax.ShapeDtypeStruct((L, D, D), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=sharding)]
    return jax.jit(f).lower(*args).compile().as_text()


@pytest.mark.parametrize("f, trips", PROGRAMS, ids=[f.__name__ for f, _ in PROGRAMS])
def test_cpu_loops_count_every_trip(f, trips):
    text = _hlo(f)
    cost = hlo_cost.analyse(text)
    assert cost.flops == trips * MATMUL and not cost.unknown_loops
    # the derivation from the counter, without XLA:CPU's annotation, gives the same count
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert "known_trip_count" not in bare
    assert hlo_cost.analyse(bare).flops == trips * MATMUL


@needs_libtpu
def test_tpu_loops_count_every_trip():
    device = hardware.tpu_devices("v5e:2x2")[0]
    for f, trips in PROGRAMS:
        text = _hlo(f, device)
        assert "known_trip_count" not in text and " while(" in text
        cost = hlo_cost.analyse(text)
        assert (cost.flops, cost.unknown_loops) == (trips * MATMUL, []), f.__name__


def test_a_loop_of_unreadable_count_is_counted_once_and_named():
    def f(w, x, n):  # the bound is an argument: no count in the HLO
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ w[0]),
                                  (0, x))[1]
    text = jax.jit(f).lower(jnp.ones((L, D, D)), jnp.ones((B, D)), 5).compile().as_text()
    cost = hlo_cost.analyse(text)
    assert cost.flops == MATMUL and cost.unknown_loops == ["jit(f)/while"]


def test_count_of_each_exit_test():
    assert hlo_loops.count(0, "LT", 4, 2) == 2      # windowed einsum: two chunks a trip
    assert hlo_loops.count(2, "LE", 11, 3) == 4     # 2, 5, 8, 11
    assert hlo_loops.count(10, "GT", 0, -3) == 4    # 10, 7, 4, 1
    assert hlo_loops.count(0, "NE", 12, 4) == 3
    assert hlo_loops.count(5, "LT", 3, 1) == 0
    assert hlo_loops.count(0, "LT", 4, -1) is None  # never ends: not a count


# A scanned model with full remat in bf16, head dim 128, FSDP over 8 devices (the layout of
# the 8B plan, whose matmuls the SPMD partitioner runs as windowed-einsum loops), 1,024 tokens.
SMALL = ["--config.data.global_batch=16", "--config.model.scan_layers=true",
         "--config.model.remat=full", "--config.model.dtype=bfloat16",
         "--config.model.n_layers=4", "--config.model.dim=256", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.model.ffn_dim=512",
         "--config.data.seq_len=1024", "--config.model.max_seq_len=1024"]


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["splash", "chunked"])
def test_tpu_plan_flops_reconcile_with_flops_py(attention):
    """compiler = HLO dots + splash calls; flops.py = useful 6ND + causal attention (6 T x H
    products per token and head). Full remat recomputes every projection but the down one
    (XLA drops it: the backward never reads its output): the dots are 6/5 to 4/3 of flops.py's
    matmuls (1.25 here; counting a windowed-einsum loop once gives 0.89). Splash runs
    2 + 2 (recomputed) + 7 products over T(T + b)/2 pairs, not T^2/2: 11/6 (1 + b/T) of the
    causal attention. Chunked attention computes every key block: 2 to 3 times it."""
    config = plan.load_config(os.path.join(ROOT, "experiments/configs/tiny.py:test"),
                              SMALL + [f"--config.mesh.attention={attention}"])
    r = plan.plan(config, "v5p:2x2x2")
    c = ModelConfig.from_dict(config.model.to_dict())
    t, rows, n = 1024, 16, 8
    attn = flops.attention_flops_per_token(c, t) * 3 * rows * t / n
    f = r["flops"]
    matmuls = f["analytic"] - attn
    assert r["attention"] == attention and not f["uncounted"]
    if attention == "splash":
        assert f["kernel"] == pytest.approx(attn * 11 / 6 * (1 + tpu.block_size(t) / t))
        assert 6 / 5 < (f["compiler"] - f["kernel"]) / matmuls < 4 / 3
    else:
        assert f["kernel"] == 0
        assert 6 / 5 * matmuls + 2 * attn < f["compiler"] < 4 / 3 * matmuls + 3 * attn
    assert 0 < r["roofline"]["mfu"] <= f["analytic"] / f["compiler"] < 1


def test_parse_puts_root_last_and_reads_kernel_calls():
    """A scheduled module may print ROOT first; a Pallas call's metadata spans lines, the last
    one starting with '}'. The kernel is listed and its operand and output bytes counted."""
    text = """HloModule m
ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  ROOT %d = f32[4,4]{1,0} dot(%e, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %a = f32[4,4]{1,0} parameter(0)
  %k = f32[4,4]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", kernel_metadata={
"block_q": 512
}}, metadata={op_name="splash"}
  %e = f32[4,4]{1,0} add(%k, %k)
}
"""
    comps, entry = hlo_cost.parse(text)
    assert [name for name, *_ in comps[entry]] == ["a", "k", "e", "d"]
    cost = hlo_cost.analyse(text)
    assert cost.custom_calls == [("k", "tpu_custom_call", [(4, 4)], 1.0)]
    assert cost.flops == 2 * 4 * 4 * 4 and cost.hbm_bytes == 2 * 64 + 3 * 64 + 3 * 64  # k, e, d


def test_a_target_backend_runs_the_attention_it_names():
    """plan.build compiles the target backend's default (`auto`): for_target(tpu, chunked)
    compiled the reference attention before its default followed the name."""
    from llama_jax import attention, backends
    for name in ("chunked", "reference"):
        backend = backends.for_target("tpu", name)
        assert backend.default_attention == name
        assert backend.with_attention("auto").attention is attention.IMPLS[name]
