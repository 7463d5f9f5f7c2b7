"""Per-device costs of a compiled XLA module, read from its optimised HLO text.

    cost = hlo_cost.analyse(compiled.as_text(), domain_of)   # FLOPs, HBM bytes, collective bytes

Why not `compiled.cost_analysis()` alone: XLA's cost analysis counts the body of a while loop
once (checked on the CPU and TPU backends of jaxlib 0.10), and a scanned model, a pipeline
schedule and gradient accumulation are all while loops, so it undercounts by about the layer
count. Here every computation is weighted by how often it runs (while bodies by their trip
count, llama_jax.hlo_loops: XLA's `known_trip_count` on CPU/GPU, the counter's init, bound
and step on TPU; a loop of unreadable count is counted once and listed in `unknown_loops`),
and:

- FLOPs: 2 x output elements x contracted elements of every `dot` and `convolution`
  (elementwise work is left out; in a transformer it is well under 1% of the FLOPs).
  Custom calls (Pallas kernels on TPU, the planner's stand-in for the GPU kernel: a Python
  callback on CPU) are opaque: they are listed in `custom_calls` with how often they run, for
  whoever knows their FLOPs (backends.tpu.kernel_flops for splash, backends.gpu.kernel_flops).
- HBM bytes: operands + results of every top-level instruction (fusions read their inputs and
  write their outputs once), as XLA's HloCostAnalysis models "bytes accessed"; a kernel's
  (KERNEL_TARGETS) too (once: the tiles it reads again are not in the HLO).
- Collective bytes sent per device, ring algorithms on a group of n devices:
  all-gather (n-1)/n x result; reduce-scatter (n-1) x result; all-reduce 2(n-1)/n x size;
  all-to-all (n-1)/n x size; collective-permute the whole buffer. Each collective is "slow" when
  a group spans several domains (TPU slices, GPU nodes) of `domain_of`, else "fast".
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from llama_jax import hlo_loops

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[su]4|[su]8|[su]16|[su]32|[su]64|f16|bf16|f32|f64|c64|c128|"
                    r"f8\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)="
                      r"(\{[^}]*\}|%[\w.\-]+)")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "custom-call",
         "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "async-done", "async-update"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Custom calls that are kernels reading their operands and writing their outputs in HBM: Pallas
# on TPU, and the Python callbacks that stand in for the Pallas GPU kernel in GPU plans.
KERNEL_TARGETS = ("tpu_custom_call", "xla_ffi_python_cpu_callback", "xla_python_cpu_callback")


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    hbm_bytes: float = 0.0
    fast_bytes: float = 0.0  # collectives inside a slice / node
    slow_bytes: float = 0.0  # collectives across slices / nodes
    collectives: dict = dataclasses.field(default_factory=dict)  # op -> bytes sent
    unknown_loops: list = dataclasses.field(default_factory=list)  # counted once: op names
    # opaque kernels (custom calls): (instruction name, target, output shapes, runs per step)
    custom_calls: list = dataclasses.field(default_factory=list)


def _arrays(shape: str):
    for dtype, dims in _ARRAY.findall(shape):
        size = math.prod(int(d) for d in dims.split(",") if d)
        yield _DTYPE_BYTES.get(dtype, 1), [int(d) for d in dims.split(",") if d], size


def array_bytes(shape: str) -> float:
    """Bytes of the arrays an HLO shape string names ('(f32[2,3]{1,0}, bf16[4])')."""
    return sum(b * n for b, _, n in _arrays(shape))


def _split_shape(rest: str) -> tuple[str, str, str]:
    """'SHAPE opcode(operands), attrs' -> (shape, opcode, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 2:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, args = rest.partition("(")
    return shape, opcode, args


def parse(text: str) -> tuple[dict, str]:
    """{computation: [(name, shape, opcode, args)], its ROOT last} and the entry's name."""
    comps, entry, current, root = {}, None, None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current, root = comps.setdefault(m.group(2), []), None
            entry = m.group(2) if m.group(1) else entry
            continue
        if line.rstrip() == "}" and root is not None:  # a scheduled module may print the
            current.append(root)                       # ROOT before other instructions
            root = None
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            instr = (m.group(1), *_split_shape(m.group(2)))
            if line.lstrip().startswith("ROOT "):
                root = instr
            else:
                current.append(instr)
    return comps, entry


def multiplicities(comps: dict, entry: str, unknown: list | None = None) -> tuple[dict, set]:
    """How often each computation runs per step, and the set of fused (kernel-internal) ones.
    While loops whose trip count is not readable from the HLO count once and are appended to
    `unknown` (their op names)."""
    mult, fused, order = {entry: 1.0}, set(), [entry]
    for comp in order:  # callers precede callees in this walk
        table = hlo_loops.table(comps[comp])
        for name, _, op, args in comps[comp]:
            times = 1
            if op == "while":
                times = hlo_loops.trip_count(args, table, comps)
                if times is None:
                    times = 1
                    if unknown is not None:
                        unknown.append(_op_name(args) or name)
            for kind, names in _CALLEES.findall(args):
                for callee in re.findall(r"%?([\w.\-]+)", names):
                    if callee not in comps:
                        continue
                    if op == "fusion" or kind == "to_apply" or comp in fused:
                        fused.add(callee)
                    mult[callee] = mult.get(callee, 0.0) + mult[comp] * (
                        times if kind == "body" else 1)
                    if callee not in order:
                        order.append(callee)
    return mult, fused


def _op_name(args: str) -> str:
    m = re.search(r'op_name="([^"]*)"', args)
    return m.group(1) if m else ""


def _dot_flops(shape, op, args, symbols) -> float:
    out = sum(n for _, _, n in _arrays(shape))
    operands = hlo_loops.operands(args)
    if len(operands) < 2:
        return 0.0
    if op == "dot":
        lhs = next(_arrays(symbols.get(operands[0], "")), (0, [], 0))[1]
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", args)
        k = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
        return 2.0 * out * k
    return _conv_flops(shape, args, symbols, operands)


def _taps(n: int, window: int, lo: int, hi: int, stride: int) -> int:
    """(output position, window position) pairs of one spatial dim that read a real input
    element, not padding."""
    out = (n + lo + hi - window) // stride + 1
    return sum(1 for o in range(out) for j in range(window) if 0 <= o * stride + j - lo < n)


def _conv_flops(shape, args, symbols, operands) -> float:
    """2 x batch x output features x input features x the window taps that read real input.
    XLA:TPU writes some dots as convolutions over a padded window (a [T, D] x [D, N, H]
    projection as size-32 windows padded 31 on each side, one real tap per output position),
    so counting every window position would overcount by the window size."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
    lhs = next(_arrays(symbols.get(operands[0], "")), (0, [], 0))[1]
    rhs = next(_arrays(symbols.get(operands[1], "")), (0, [], 0))[1]
    out = next(_arrays(shape), (0, [], 0))[1]
    if not labels or [len(x) for x in labels.groups()] != [len(lhs), len(rhs), len(out)]:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    flops = 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    window = re.search(r"window=\{([^}]*)\}", args)
    fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
    for d in sorted(c for c in lhs_l if c.isdigit()):
        i = int(d)
        size = int(fields["size"].split("x")[i]) if "size" in fields else rhs[rhs_l.index(d)]
        lo, hi = map(int, fields["pad"].split("x")[i].split("_")) if "pad" in fields else (0, 0)
        stride = int(fields["stride"].split("x")[i]) if "stride" in fields else 1
        flops *= _taps(lhs[lhs_l.index(d)], size, lo, hi, stride)
    return flops


_SLICES = ("dynamic-slice", "slice", "gather")


def _io_bytes(shape, op, args, symbols, comps) -> float:
    """HBM bytes read and written by one top-level instruction. Like XLA's HloCostAnalysis, a
    slice reads only what it extracts and a dynamic-update-slice writes only its update in
    place: inside a scan over stacked layers, counting the whole [L, ...] stack every
    iteration would overcount by L."""
    ops = hlo_loops.operands(args)
    if op in _SLICES:
        return 2 * array_bytes(shape)
    if op == "dynamic-update-slice":
        return 2 * array_bytes(symbols.get(ops[1], "")) if len(ops) > 1 else 0.0
    if op != "fusion":
        return array_bytes(shape) + sum(array_bytes(symbols.get(o, "")) for o in ops)
    callee = re.search(r"calls=%([\w.\-]+)", args)
    body = comps.get(callee.group(1), []) if callee else []
    if not body:
        return array_bytes(shape) + sum(array_bytes(symbols.get(o, "")) for o in ops)
    inner = hlo_loops.table(body)
    users: dict[str, list] = {}
    for name, s, o, a in body:
        for x in hlo_loops.operands(a):
            users.setdefault(x, []).append((name, s, o, a))
    root_name, root_shape, root_op, root_args = body[-1]
    outs = hlo_loops.operands(root_args) if root_op == "tuple" else [root_name]
    written, in_place = 0.0, set()
    for name in outs:
        s, o, a = inner.get(name, (root_shape, root_op, root_args))
        if o == "dynamic-update-slice":
            written += array_bytes(inner.get(hlo_loops.operands(a)[1], ("",))[0])
            in_place.add(hlo_loops.operands(a)[0])
        else:
            written += array_bytes(s)
    read = 0.0
    for name, s, o, _ in body:
        if o != "parameter" or name in in_place:
            continue
        use = users.get(name, [])
        sliced = use and all(u[2] in _SLICES for u in use)
        read += sum(array_bytes(u[1]) for u in use) if sliced else array_bytes(s)
    return read + written


def _groups(args: str) -> list[list[int]]:
    """Replica groups in any of XLA's three spellings (explicit, iota, mesh axes)."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", args)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", args)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        keep = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        rest = [i for i in range(len(names)) if i not in keep]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + keep)
        return ids.reshape(-1, math.prod(sizes[i] for i in keep) if keep else 1).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{} ]*\})\}", args)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                         m.group(1))]
    return []


def _collective(op, shape, args, symbols, domain_of):
    """(bytes sent per device, crosses domains) of one collective instruction."""
    groups = _groups(args)
    size = array_bytes(shape)
    if op.startswith("collective-permute"):
        n, sent = 2, array_bytes(symbols.get(re.findall(r"%([\w.\-]+)", args)[0], shape))
    else:
        n = max((len(g) for g in groups), default=1)
        if op.endswith("-start") and shape.startswith("("):  # (operand, result) tuples
            size = list(_arrays(shape))[-1][0] * list(_arrays(shape))[-1][2]
        factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                  "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n}
        sent = size * factor[op.removesuffix("-start")]
    slow = any(len({domain_of[i] for i in g if i < len(domain_of)}) > 1 for g in groups)
    return (sent if n > 1 else 0.0), slow


def analyse(text: str, domain_of=()) -> Cost:
    """Per-device Cost of one execution of the module in `text` (compiled.as_text())."""
    comps, entry = parse(text)
    cost, seen = Cost(), {}
    mult, fused = multiplicities(comps, entry, cost.unknown_loops)
    for comp, instrs in comps.items():
        times = mult.get(comp, 0.0)
        symbols = {name: shape for name, shape, _, _ in instrs}
        for name, shape, op, args in instrs:
            if op in ("dot", "convolution"):
                cost.flops += times * _dot_flops(shape, op, args, symbols)
            if comp not in fused and op not in _FREE:
                cost.hbm_bytes += times * _io_bytes(shape, op, args, symbols, comps)
            if op == "custom-call" and comp not in fused and times:
                target = re.search(r'custom_call_target="([^"]*)"', args)
                target = target.group(1) if target else ""
                # a callback's instruction name is generic; its op_name ends in the scope its
                # caller named it by
                label = _op_name(args) if "callback" in target else name
                cost.custom_calls.append((label or name, target,
                                          [tuple(d) for _, d, _ in _arrays(shape)], times))
                if target in KERNEL_TARGETS:  # a kernel reads its operands and writes its
                    # outputs at least once (a lower bound: tiles it re-reads are not seen)
                    cost.hbm_bytes += times * _io_bytes(shape, op, args, symbols, comps)
            if op.removesuffix("-start") in COLLECTIVES:
                channel = re.search(r"channel_id=(\d+)", args)
                key = channel.group(1) if channel else f"{comp}/{name}"
                sent, slow = _collective(op, shape, args, symbols, domain_of)
                seen[key] = max(seen.get(key, (0.0, False, op)), (times * sent, slow, op))
    for sent, slow, op in seen.values():
        if slow:
            cost.slow_bytes += sent
        else:
            cost.fast_bytes += sent
        op = op.removesuffix("-start")
        cost.collectives[op] = cost.collectives.get(op, 0.0) + sent
    return cost
