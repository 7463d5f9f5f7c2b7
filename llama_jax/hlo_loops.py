"""Trip counts of XLA while loops, read from compiled HLO text (llama_jax.hlo_cost weights each
loop body by its count).

XLA:CPU and XLA:GPU annotate a counted loop with `backend_config={"known_trip_count":{"n":N}}`.
XLA:TPU (libtpu 0.0.x) prints no annotation, so the count is derived here the way XLA's own
while-loop analysis does, from the loop's three parts:

    condition: ROOT compare(get-tuple-element(param, index=i), constant(bound)), direction=LT
    init:      element i of the while's operand tuple, a constant (through copies, converts)
    body:      element i of the body's ROOT tuple, add(get-tuple-element(param, i), constant(step))

Loops of a compiled train step on TPU: lax.scan over layers (s32 counter, 0 to L by 1), the
chunked attention's loops over key blocks, and the SPMD partitioner's windowed einsums
(`windowed_dot_general_body_*`: an FSDP weight gathered chunk by chunk around the ring while
the matmul runs, u32 counter stepping by 2, two chunks per iteration). A loop of another form
gives None: the caller counts it once and says so, rather than guess.
"""

from __future__ import annotations

import math
import re

_PASS = ("copy", "convert", "bitcast", "reshape", "copy-start", "copy-done")
_NAME = r"%([\w.\-]+)"
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}


def table(instrs) -> dict:
    """{name: (shape, opcode, args)} of one computation's instructions."""
    return {name: (shape, op, args) for name, shape, op, args in instrs}


def operands(args: str) -> list[str]:
    return re.findall(_NAME, args.split(")")[0])


def _instr(name: str, tab: dict, comps: dict) -> tuple[str, list[str], str]:
    """(opcode, operand names, attributes) of `name`; a fusion that wraps one scalar op of
    its parameters (XLA:CPU's `wrapped_add`, `wrapped_compare`) reads as that op."""
    _, op, args = tab.get(name, ("", "", ""))
    ops = operands(args)
    callee = re.search(r"calls=" + _NAME, args)
    if op == "fusion" and callee and comps.get(callee.group(1)):
        body = comps[callee.group(1)]
        inner = table(body)
        _, _, root_op, root_args = body[-1]
        params = []
        for o in operands(root_args):
            m = re.match(r"(\d+)\)", inner.get(o, ("", "", ""))[2])
            if inner.get(o, ("", "", ""))[1] != "parameter" or not m or int(m.group(1)) >= len(ops):
                return op, ops, args
            params.append(ops[int(m.group(1))])
        return root_op, params, root_args.partition(")")[2]
    return op, ops, args


def _source(name: str, tab: dict, comps: dict) -> str:
    """The instruction `name` copies or converts (a scalar keeps its value through them)."""
    for _ in range(64):
        op, ops, _ = _instr(name, tab, comps)
        if op not in _PASS or not ops:
            return name
        name = ops[0]
    return name


def constant(name: str, tab: dict, comps: dict, depth: int = 0) -> int | None:
    """The integer value of a scalar built from constants (add, subtract, multiply, a tuple
    element), else None."""
    name = _source(name, tab, comps)
    if name not in tab or depth > 32:
        return None
    op, ops, args = _instr(name, tab, comps)
    if op == "constant":
        m = re.match(r"(-?\d+)\)", tab[name][2])
        return int(m.group(1)) if m else None
    if op == "get-tuple-element":
        src = tab.get(ops[0], ("", "", ""))
        index = int(re.search(r"index=(\d+)", args).group(1))
        if src[1] != "tuple":
            return None
        return constant(operands(src[2])[index], tab, comps, depth + 1)
    if op in ("add", "subtract", "multiply") and len(ops) == 2:
        a, b = (constant(o, tab, comps, depth + 1) for o in ops)
        if a is not None and b is not None:
            return {"add": a + b, "subtract": a - b, "multiply": a * b}[op]
    return None


def element(name: str, tab: dict, comps: dict) -> int | None:
    """i when `name` is element i of the computation's (tuple) parameter, else None."""
    op, ops, args = _instr(_source(name, tab, comps), tab, comps)
    if op != "get-tuple-element" or tab.get(ops[0], ("", "", ""))[1] != "parameter":
        return None
    return int(re.search(r"index=(\d+)", args).group(1))


def _exit_test(cond: list, comps: dict) -> tuple[int, str, int] | None:
    """(counter element i, direction, bound) of a condition `ROOT compare(param[i], bound)`."""
    tab = table(cond)
    op, ops, args = _instr(cond[-1][0], tab, comps)
    direction = re.search(r"direction=(\w+)", args)
    if op != "compare" or not direction or len(ops) != 2:
        return None
    (a, b), d = ops, direction.group(1)
    for x, y, way in ((a, b, d), (b, a, _FLIP[d])):  # the counter on the left, or the right
        i, bound = element(x, tab, comps), constant(y, tab, comps)
        if i is not None and bound is not None:
            return i, way, bound
    return None


def _step(body: list, i: int, comps: dict) -> int | None:
    """How much the body adds to counter element i per iteration."""
    tab = table(body)
    _, _, op, args = body[-1]
    if op != "tuple" or len(operands(args)) <= i:
        return None
    op, ops, _ = _instr(_source(operands(args)[i], tab, comps), tab, comps)
    if op not in ("add", "subtract") or len(ops) != 2:
        return None
    sign = 1 if op == "add" else -1
    if element(ops[0], tab, comps) == i and (c := constant(ops[1], tab, comps)) is not None:
        return sign * c
    if op == "add" and element(ops[1], tab, comps) == i:
        return constant(ops[0], tab, comps)
    return None


def count(init: int, direction: str, bound: int, step: int) -> int | None:
    """Iterations of `for (c = init; c <direction> bound; c += step)`."""
    if step == 0:
        return None
    if direction in ("LE", "GE"):
        bound += 1 if direction == "LE" else -1
        direction = direction[0] + "T"
    if direction == "LT" and step > 0:
        return max(0, math.ceil((bound - init) / step))
    if direction == "GT" and step < 0:
        return max(0, math.ceil((init - bound) / -step))
    if direction == "NE" and (bound - init) % step == 0 and (bound - init) // step >= 0:
        return (bound - init) // step
    return None


def trip_count(args: str, caller: dict, comps: dict) -> int | None:
    """Iterations of the while instruction with operand text `args` in a computation whose
    instructions are `caller` (a table()), or None when not readable."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', args)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=" + _NAME, args)
    body = re.search(r"body=" + _NAME, args)
    if not cond or not body or cond.group(1) not in comps or body.group(1) not in comps:
        return None
    test = _exit_test(comps[cond.group(1)], comps)
    if test is None:
        return None
    i, direction, bound = test
    init_tuple = caller.get(_source(operands(args)[0], caller, comps), ("", "", ""))
    if init_tuple[1] != "tuple" or len(operands(init_tuple[2])) <= i:
        return None
    init = constant(operands(init_tuple[2])[i], caller, comps)
    step = _step(comps[body.group(1)], i, comps)
    if init is None or step is None:
        return None
    return count(init, direction, bound, step)
