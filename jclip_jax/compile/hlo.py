"""Read a compiled program's HLO text: matmul FLOPs counted with loop trip counts, their dtype mix, the
collectives (bytes: the full, unsharded size of the array each one gathers or reduces) and an estimate of
HBM traffic (operands and results of the unfused instructions, slices of
in-place buffers counted as slices), all per device.

Why hand-written: XLA's `cost_analysis()` counts a while-loop body once, and this model runs almost
everything in loops (`lax.scan` over layers, the loss's gather loop, GradCache's micro-batches), so it
undercounts FLOPs about tenfold. Here every computation gets a multiplier, the number of times one step
runs it: 1 for the entry, times the trip count for a while body, inherited through fusions and calls.
Trip counts come from XLA's `known_trip_count` annotation when present, else from the loop condition
(`counter < N` with the counter's initial value read from the while's init tuple, step 1); a loop whose
count cannot be read is counted once and listed in `unknown_trip_counts`.

    analysis = analyze(compiled.as_text())
    analysis.matmul_flops, analysis.dtype_mix, analysis.collectives, analysis.hbm_bytes
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
    "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# Ops that move no HBM data of their own (structure, aliases, control flow whose bodies are counted).
NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
              "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "async-done", "async-start",
              "copy-start", "copy-done", "add-dependency"}

_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ONE_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_MANY_CALLEES = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # e.g. 'bf16[8,128]{1,0}' or a tuple '(s32[], f32[4]{0})'
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(self.shape)]

    @property
    def bytes(self) -> float:
        return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in self.arrays)


@dataclasses.dataclass
class Analysis:
    """Per-device figures for one execution of the program (one training step)."""

    matmul_flops: float = 0.0
    matmul_flops_once: float = 0.0  # every loop body counted once (what cost_analysis() does)
    # dtype mix ('bf16 x bf16 -> f32') -> {'file.py:line function [jax op_name]': FLOPs}: where each mix
    # comes from, down to the Python line
    matmul_sources: dict = dataclasses.field(default_factory=dict)
    # 'kind shape' (layout dropped) -> {'count': n, 'bytes': b}: which arrays the traffic is made of
    collective_arrays: dict = dataclasses.field(default_factory=dict)
    hbm_bytes: float = 0.0
    loops: list = dataclasses.field(default_factory=list)  # (while name, trip count)
    unknown_trip_counts: list = dataclasses.field(default_factory=list)
    unknown_kernels: list = dataclasses.field(default_factory=list)  # custom kernels whose FLOPs are not known

    @property
    def dtype_mix(self) -> dict:
        """dtype mix -> matmul FLOPs, summed over `matmul_sources`."""
        return {mix: sum(sources.values()) for mix, sources in self.matmul_sources.items()}

    def add_matmul(self, mix: str, source: str, flops: float, times: float) -> None:
        self.matmul_flops += times * flops
        self.matmul_flops_once += flops
        sources = self.matmul_sources.setdefault(mix, {})
        sources[source] = sources.get(source, 0.0) + times * flops

    @property
    def collectives(self) -> dict:
        """kind -> {'count': n, 'bytes': b}, summed over `collective_arrays`."""
        kinds: dict = {}
        for array, c in self.collective_arrays.items():
            entry = kinds.setdefault(array.split(" ", 1)[0], {"count": 0, "bytes": 0.0})
            entry["count"] += c["count"]
            entry["bytes"] += c["bytes"]
        return kinds

    @property
    def collective_bytes(self) -> float:
        return sum(c["bytes"] for c in self.collective_arrays.values())


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({":
            depth += 1
        elif text[i] in ")}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _split_top_level(text: str) -> list[str]:
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        out.append("".join(current))
    return out


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(2), re.sub(r"/\*.*?\*/", "", m.group(3))
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = [piece.split()[-1].lstrip("%") for piece in _split_top_level(rest[op.end():close - 1])
                if piece.strip()]
    return Instruction(name, shape, op.group(1), operands, rest[close:], root=bool(m.group(1)))


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """HLO module text -> ({computation name: instructions}, entry computation name)."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            instr = _parse_instruction(line)
            if instr is not None:
                computations[current].append(instr)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def source_lines(text: str) -> dict[int, str]:
    """stack_frame_id -> 'file.py:line function' of the Python line that traced the op.

    The module text opens with jax's tables of file names, function names, locations and stack frames; the
    frame an instruction's metadata names is the innermost user frame (jax filters its own), e.g.
    'models/eva02.py:109 EvaBlock.attention'. Files inside the package are shown relative to it."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in _TABLES:
            current = tables.setdefault(line, {})
        elif current is not None and line[:1].isdigit():
            key, value = line.split(" ", 1)
            current[int(key)] = value.strip().strip('"')
        elif current is not None:
            current = None
            if len(tables) == len(_TABLES):
                break
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    lines = {}
    for frame, value in tables.get("StackFrames", {}).items():
        location = re.search(r"file_location_id=(\d+)", value)
        where = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)",
                          tables["FileLocations"].get(int(location.group(1)), "")) if location else None
        if where:
            path = files.get(int(where.group(1)), "?").split("/jclip_jax/")[-1]
            lines[frame] = f"{path}:{where.group(3)} {functions.get(int(where.group(2)), '?')}"
    return lines


def _callees(instr: Instruction) -> list[tuple[str, str]]:
    out = [(m.group(1), m.group(2)) for m in _ONE_CALLEE.finditer(instr.attrs)]
    for m in _MANY_CALLEES.finditer(instr.attrs):
        out += [(m.group(1), c.strip().lstrip("%")) for c in m.group(2).split(",") if c.strip()]
    return out


def trip_count(while_instr: Instruction, caller: list[Instruction], condition: list[Instruction],
               body: list[Instruction] = ()) -> int | None:
    """The while loop's trip count: XLA's annotation, else `counter < N` (or <=, >, >=) in the condition
    with the counter's initial value from the init tuple (a constant, possibly copied; else 0) and its
    step from the body (`counter + constant`; else 1)."""
    m = _TRIP.search(while_instr.attrs)
    if m:
        return int(m.group(1))
    by_name = {i.name: i for i in condition}
    root = _through_copies(next((i for i in condition if i.root), None), by_name)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root.attrs)
    a, b = (by_name.get(n) for n in root.operands)
    consts = {n: _literal(_through_copies(by_name.get(n), by_name)) for n in root.operands}
    if consts[root.operands[1]] is not None and a is not None and a.opcode == "get-tuple-element":
        counter, bound, op = a, consts[root.operands[1]], direction.group(1) if direction else "LT"
    elif consts[root.operands[0]] is not None and b is not None and b.opcode == "get-tuple-element":
        flip = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}
        counter, bound, op = b, consts[root.operands[0]], flip.get(direction.group(1) if direction else "", "")
    else:
        return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    start = 0
    caller_by_name = {i.name: i for i in caller}
    init = caller_by_name.get(while_instr.operands[0]) if while_instr.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        value = _literal(_through_copies(caller_by_name.get(init.operands[index]), caller_by_name))
        start = value if value is not None else 0
    step = _counter_step(body, index) or 1
    if op == "LE":
        bound += 1
    elif op != "LT":
        return None
    return max(-(-(bound - start) // step), 0)


def _through_copies(instr: Instruction | None, by_name: dict) -> Instruction | None:
    while instr is not None and instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
        instr = by_name.get(instr.operands[0])
    return instr


def _counter_step(body: list[Instruction], index: int) -> int | None:
    """The constant c of `counter + c` that the loop body's root tuple puts at `index`, if that is its form."""
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
        return None
    values = [_literal(_through_copies(by_name.get(o), by_name)) for o in update.operands]
    return next((v for v in values if v is not None and v > 0), None)


def _literal(instr: Instruction | None) -> int | None:
    """The integer value of a scalar `constant(N)` instruction, else None."""
    if instr is None or instr.opcode != "constant" or len(instr.operands) != 1:
        return None
    try:
        return int(instr.operands[0])
    except ValueError:
        return None


def multipliers(computations: dict[str, list[Instruction]], entry: str):
    """How many times one run executes each computation; also the set of fusion bodies and the loops."""
    edges = collections.defaultdict(list)  # caller -> [(callee, factor)]
    fused, loops, unknown = set(), [], []
    for name, instrs in computations.items():
        for instr in instrs:
            callees = _callees(instr)
            if instr.opcode == "while":
                cond = dict(callees).get("condition")
                body = dict(callees).get("body")
                n = trip_count(instr, instrs, computations.get(cond, []), computations.get(body, []))
                if n is None:
                    unknown.append(instr.name)
                loops.append((instr.name, n))
                edges[name] += [(body, n if n is not None else 1), (cond, (n if n is not None else 1) + 1)]
            else:
                edges[name] += [(c, 1) for _, c in callees]
                if instr.opcode == "fusion":
                    fused.update(c for _, c in callees)
    indegree = collections.Counter(c for callers in edges.values() for c, _ in callers)
    mult = collections.defaultdict(float, {entry: 1.0})
    ready = [c for c in computations if indegree[c] == 0]
    while ready:  # Kahn's order: a computation's multiplier is final once all its callers are done
        name = ready.pop()
        for callee, factor in edges.get(name, []):
            mult[callee] += mult[name] * factor
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    return mult, fused, loops, unknown


def _window(attrs: str, key: str, rank: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\dx_]+)", attrs)
    return [int(v) for v in m.group(1).split("x")] if m else [default] * rank


def _valid_taps(in_size: int, out_size: int, window: int, stride: int, lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dimension that read a real input element
    (not padding, not a hole of lhs dilation), as XLA's own cost analysis counts them."""
    last = (in_size - 1) * lhs_dilate
    count = 0
    for k in range(window):
        offset = k * rhs_dilate - lo
        for o in range(out_size):
            pos = o * stride + offset
            if 0 <= pos <= last and pos % lhs_dilate == 0:
                count += 1
    return count


def matmul_flops(instr: Instruction, shapes: dict[str, Instruction]) -> float:
    """FLOPs (2 per multiply-add) of a dot or a convolution; a convolution's windowed dimensions count only
    the taps that land on real input (TPU lowers some ops to dilated, padded convolutions)."""
    out_shape = instr.arrays[0][1]
    out = math.prod(out_shape)
    if instr.opcode == "dot":
        lhs = shapes[instr.operands[0]].arrays[0][1]
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        contracted = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
        return 2.0 * out * contracted
    lhs = shapes[instr.operands[0]].arrays[0][1]
    kernel = shapes[instr.operands[1]].arrays[0][1]
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if not labels:
        return 2.0 * out * math.prod(kernel) / max(kernel[-1], 1)
    lhs_l, ker_l, out_l = labels.groups()
    spatial = sorted(c for c in ker_l if c.isdigit())
    rank = len(spatial)
    sizes = _window(instr.attrs, "size", rank, 1)
    strides = _window(instr.attrs, "stride", rank, 1)
    lhs_dil = _window(instr.attrs, "lhs_dilate", rank, 1)
    rhs_dil = _window(instr.attrs, "rhs_dilate", rank, 1)
    pad = re.search(r"\bpad=([\d_x-]+)", instr.attrs)
    lows = [int(p.split("_")[0]) for p in pad.group(1).split("x")] if pad else [0] * rank
    macs = out_shape[out_l.index("b")] * out_shape[out_l.index("f")] * kernel[ker_l.index("i")]
    for j, d in enumerate(spatial):
        macs *= _valid_taps(lhs[lhs_l.index(d)], out_shape[out_l.index(d)], sizes[j], strides[j], lows[j],
                            lhs_dil[j], rhs_dil[j])
    return 2.0 * macs


def _traffic(instr: Instruction, shapes: dict, computations: dict) -> float:
    """Bytes one top-level instruction reads and writes in HBM: its operands and result, except that a
    dynamic-slice reads only the slice and a dynamic-update-slice (in place, e.g. a scan writing layer i of
    a stacked buffer) writes only the update, also when they sit inside a fusion on one of its parameters."""
    operand = [shapes[o].bytes if o in shapes else 0.0 for o in instr.operands]
    out = instr.bytes
    if instr.opcode == "dynamic-slice":
        return 2.0 * out
    if instr.opcode == "dynamic-update-slice":
        return 2.0 * operand[1] if len(operand) > 1 else out
    if instr.opcode == "fusion":
        body = computations.get(dict(_callees(instr)).get("calls", ""), [])
        params = {i.name: int(i.operands[0]) for i in body if i.opcode == "parameter" and i.operands
                  and i.operands[0].isdigit()}
        by_name = {i.name: i for i in body}
        for i in body:
            source = i.operands[0] if i.operands else None
            index = params.get(source)
            if index is None or index >= len(operand):
                continue
            if i.opcode == "dynamic-slice":
                operand[index] = min(operand[index], i.bytes)
            elif i.opcode == "dynamic-update-slice" and len(i.operands) > 1:
                update = by_name.get(i.operands[1])
                out -= operand[index] - (update.bytes if update else 0.0)  # the buffer is updated in place
                operand[index] = 0.0
    return max(out, 0.0) + sum(operand)


# Pallas' TPU flash-attention backward kernels carry no cost estimate: their matmul FLOPs per (batch, head)
# in units of q_len * kv_len * head_dim, counted from the kernels' dots (jax.experimental.pallas.ops.tpu.
# flash_attention): dk/dv recompute the logits and run dp, dv, dk (4 dots); dq recomputes the logits and runs
# dp and dq (3 dots).
KERNEL_FLOPS = {"flash_mha_bwd_dkv": 8, "flash_mha_bwd_dq": 6}


def kernel_flops(instr: Instruction, shapes: dict) -> float | None:
    """FLOPs of a `tpu_custom_call` (a Pallas/Mosaic kernel): its cost estimate, else KERNEL_FLOPS, else None."""
    estimate = re.search(r'cost_estimate[^{]*\{[^}]*?\\?"flops\\?":\s*\\?"?(\d+)', instr.attrs)
    if estimate:
        return float(estimate.group(1))
    for prefix, per in KERNEL_FLOPS.items():
        if instr.name.startswith(prefix) and len(instr.operands) >= 2:
            (_, q), (_, k) = (shapes[o].arrays[0] for o in instr.operands[:2])
            return float(per * math.prod(q) * k[-2])  # q (B, heads, Lq, head_dim), k (B, heads, Lk, head_dim)
    return None


def analyze(text: str) -> Analysis:
    computations, entry = parse(text)
    lines = source_lines(text)
    mult, fused, loops, unknown = multipliers(computations, entry)
    result = Analysis(loops=loops, unknown_trip_counts=unknown)
    # XLA's TPU async collectives clone one collective (same channel id) into the start fusion, the
    # `async_collective_fusion.N` continuations that overlap its steps with compute, and the done fusion,
    # all called from one computation: the data moves once. Other collectives may share a channel id
    # (e.g. the loss's shard_map all-reduces) and are each counted.
    async_caller = {callee: name for name, instrs in computations.items() for i in instrs
                    for _, callee in _callees(i)
                    if callee.startswith("async_collective_fusion") or i.name.startswith("async-collective-")}
    collectives: dict[str, tuple[str, float, float]] = {}  # one collective -> (array, bytes, times)
    for name, instrs in computations.items():
        times = mult.get(name, 0.0)
        if not times:
            continue
        shapes = {i.name: i for i in instrs}
        for instr in instrs:
            op = instr.opcode
            if op in ("dot", "convolution"):
                lhs, rhs = (shapes[o].arrays[0][0] for o in instr.operands[:2])
                precision = re.search(r"operand_precision=\{(\w+)", instr.attrs)
                key = f"{lhs} x {rhs} -> {instr.arrays[0][0]}"
                if precision and precision.group(1).lower() != "default":
                    key += f" ({precision.group(1).lower()})"
                frame = re.search(r"stack_frame_id=(\d+)", instr.attrs)
                op_name = re.search(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"', instr.attrs)
                source = lines.get(int(frame.group(1)), "?") if frame else "?"
                source += f" [{op_name.group(1)}]" if op_name else ""
                result.add_matmul(key, source, matmul_flops(instr, shapes), times)
            if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in instr.attrs:
                flops = kernel_flops(instr, shapes)
                if flops is None:
                    result.unknown_kernels.append(instr.name)
                else:
                    lhs, rhs = (shapes[o].arrays[0][0] for o in instr.operands[:2])
                    result.add_matmul(f"{lhs} x {rhs} -> f32 (pallas kernel)", instr.name.split(".")[0], flops,
                                      times)
            kind = op.removesuffix("-start")
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                # TPU's reduce-scatter: a kCustom fusion `all-reduce-scatter.N` wrapping an all-reduce and
                # the dynamic-slices of its result; its all-reduce moves reduce-scatter traffic.
                kind = "reduce-scatter"
            if kind in COLLECTIVES and not op.endswith("-done"):
                operand_bytes = sum(shapes[o].bytes for o in instr.operands if o in shapes)
                result_bytes = instr.bytes - operand_bytes if op.endswith("-start") else instr.bytes
                array = f"{kind} " + re.sub(r"\{[^{}]*\}", "", instr.shape).replace(" ", "")
                channel = re.search(r"channel_id=(\d+)", instr.attrs)
                key = (f"{async_caller[name]}/channel {channel.group(1)}" if channel and name in async_caller
                       else f"{name}/{instr.name}")
                if key not in collectives or collectives[key][2] < times:
                    collectives[key] = (array, max(result_bytes, operand_bytes), times)
            if name not in fused and op not in NO_TRAFFIC and not op.endswith("-done"):
                result.hbm_bytes += times * _traffic(instr, shapes, computations)
    for array, size, times in collectives.values():
        entry_ = result.collective_arrays.setdefault(array, {"count": 0, "bytes": 0.0})
        entry_["count"] += times
        entry_["bytes"] += times * size
    return result
