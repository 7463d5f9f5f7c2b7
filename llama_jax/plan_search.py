"""`--search` for tools/plan.py, and the plan's text report.

    results = plan_search.search(config, "v5p:4x4x4", max_compiles=8)   # fitting first, by MFU
    print(plan_search.format_report(results[0]))

The search enumerates mesh factorisations of the target's device count over (data, pipeline,
context, tensor), remat policies and gradient-accumulation microbatches; drops layouts whose
parameters and AdamW state alone cannot fit (cheap arithmetic), compiles up to `max_compiles`
of the rest, simplest first, and ranks those that fit by predicted MFU.
"""

from __future__ import annotations

import itertools

from llama_jax import hardware, plan
from llama_jax.config import ModelConfig

REMATS = ("none", "dots_no_batch", "full")  # least recomputation first
MAX_TENSOR = 8   # a GPU node / neighbouring TPU chips: tensor parallelism stays on fast links
MAX_STAGES = 16  # the Llama 3 paper's deepest pipeline


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def meshes(mcfg: ModelConfig, n_devices: int, rows: int, seq_len: int):
    """(data, pipeline, context, tensor) sizes that the model and batch can be split over,
    fewest model-parallel devices first (they cost communication that data parallelism
    does not)."""
    contexts = _divisors(16, 16) if seq_len >= 32768 else [1]
    out = []
    for t, p, c in itertools.product(_divisors(mcfg.n_heads, MAX_TENSOR),
                                     _divisors(mcfg.n_layers, MAX_STAGES), contexts):
        if n_devices % (t * p * c) or seq_len % (2 * c):
            continue
        d = n_devices // (t * p * c)
        if rows % d == 0 and (p == 1 or (rows // d) % p == 0):
            out.append((d, p, c, t))
    return sorted(out, key=lambda m: (m[1] * m[2] * m[3], m[1], m[2]))


def state_bytes_per_device(config, mesh) -> float:
    """Parameters + AdamW moments per device if every weight were split over all model axes
    and (FSDP) the data axis: a lower bound used to skip hopeless layouts before compiling."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    n_params = plan.flops.layer_matmul_params(mcfg) + 2 * mcfg.dim * mcfg.vocab_size
    width = 4 if mcfg.param_dtype == "float32" else 2
    split = mesh[1] * mesh[3] * (mesh[0] if config.mesh.fsdp else 1)
    return 3 * width * n_params / split


def candidates(config, target: hardware.Target):
    """Override lists for every layout worth compiling, in the order they are tried."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    capacity = target.device.hbm_bytes / target.devices_per_chip
    rows, t = config.data.global_batch, config.data.seq_len
    out = []
    for mesh in meshes(mcfg, target.n_devices, rows, t):
        if state_bytes_per_device(config, mesh) > capacity:
            continue
        per_rank = rows // mesh[0]
        for remat, micro in itertools.product(REMATS, (1, 2, 4, 8)):
            if per_rank % micro or (micro > 1 and remat != "full"):
                continue  # accumulation only pays once recomputation is already maximal
            out.append([f"mesh.{a}={s}" for a, s in zip(("data", "pipeline", "context",
                                                         "tensor"), mesh)]
                       + [f"model.remat={remat}", f"optim.accumulation_steps={micro}"])
    return out


def search(config, target_name: str, max_compiles: int = 8) -> list[dict]:
    """Plans of up to max_compiles layouts: the fitting ones by predicted MFU, then the rest."""
    target = hardware.parse_target(target_name, plan.cpu_device(config))
    layouts = candidates(config, target)[:max_compiles]
    if not layouts:
        raise ValueError(f"no layout of {target.n_devices} devices can hold the parameters and "
                         f"optimizer state of this model; choose a larger target.")
    results = plan.plan_many(config, target_name, layouts)
    mfu = lambda r: r.get("roofline", {}).get("mfu", 0.0)  # noqa: E731
    return sorted(results, key=lambda r: (not r["fits"], -mfu(r)))


# ----------------------------------------------------------------------------------------------
# Text output.


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f}"


def format_report(r: dict) -> str:
    """The plan as a short text table (tools/plan.py's default output)."""
    mesh = " · ".join(f"{k} {v}" for k, v in r["mesh"].items())
    head = [f"{r['config']} on {r['target']}: {r['devices']} x {r['device']}"
            + ("  [ESTIMATE: compiled for simulated CPU devices]" if r["estimate"] else ""),
            f"  mesh {mesh}; remat {r['remat']}; attention {r.get('attention')}; batch "
            f"{r['global_batch']} x {r['seq_len']} tokens, {r['accumulation_steps']} accumulation step(s)"]
    if r.get("compiled_mesh") and r["compiled_mesh"] != r["mesh"]:
        head.append(f"  compiled on a smaller stand-in mesh {r['compiled_mesh']} with the same "
                    f"rows and model shards per device (parameter/optimizer bytes: full mesh; "
                    f"temporaries: the stand-in's, an overestimate where they hold FSDP shards; "
                    f"with fewer stages, costs scaled to the full pipeline loop)")
    if "memory" not in r:
        return "\n".join(head + [f"  DOES NOT FIT: {r['reason']}"])
    m = r["memory"]
    lines = head + ["  per device                  GiB"]
    for key in ("params", "optimizer", "temporaries", "other", "total"):
        if key in m:
            lines.append(f"    {key:<22}{_gib(m[key])}")
    lines.append(f"    {'device memory':<22}{_gib(m['capacity'])}   "
                 + ("fits" if r["fits"] else "DOES NOT FIT"))
    if not r["fits"]:
        lines.append(f"  reason: {r['reason']}")
    if "roofline" in r:
        f, rl = r["flops"], r["roofline"]
        kernel = (f" + {f['kernel']:.3e} of the attention kernel's calls" if f.get("kernel")
                  else "")
        lines += [f"  FLOPs per device and step: compiler {f['compiler']:.3e} (HLO dots x loop "
                  f"trip counts{kernel}), analytic {f['analytic']:.3e} (llama_jax.flops), ratio "
                  f"{f['executed_over_analytic']:.3f}",
                  f"  roofline: compute {rl['compute_s']:.3g} s, HBM {rl['hbm_s']:.3g} s, "
                  f"collectives {rl['comm_s']:.3g} s -> step {rl['step_s']:.3g} s "
                  f"({rl['bound']}-bound; no overlap: {rl['serial_s']:.3g} s)",
                  f"  predicted MFU {100 * rl['mfu']:.1f}%, {rl['tokens_per_s']:,.0f} tokens/s; "
                  f"compiled in {r['compile_s']} s"]
        lines += [f"  not counted: {item}" for item in f.get("uncounted", [])]
    return "\n".join(lines)


def format_ranking(results: list[dict]) -> str:
    """One line per searched layout, best first (the head of --search's text output)."""
    lines = [" #  data pipe ctx  tp  remat          micro  GiB/device  fits  step s    MFU"]
    for i, r in enumerate(results, 1):
        m, total = r["mesh"], r.get("memory", {}).get("total", float("nan"))
        rl = r.get("roofline", {})
        lines.append(f"{i:2d} {m['data']:5d} {m['pipeline']:4d} {m['context']:3d} "
                     f"{m['tensor']:3d}  {r['remat']:<14} {r['accumulation_steps']:5d} "
                     f"{total / 2**30:11.2f}  {'yes' if r['fits'] else 'no':>4}  "
                     f"{rl.get('step_s', float('nan')):7.3g} {100 * rl.get('mfu', 0):5.1f}%")
    return "\n".join(lines)
