"""Memory analysis: liveness of intermediate tensors over a schedule, an arena plan, its checker,
and memory-aware schedules.

A model becomes a ``Program``: its top-level nodes in order (``Op``: what each reads, outer-scope
reads of its If/Loop/Scan bodies included, and writes) and the byte size of every intermediate
tensor, from inferred shapes. A body's own tensors live while its node runs: they are the node's
``scratch`` (the body's planned arena plus its inputs). Graph inputs and weights (initializers,
Constant nodes) are not in the arena; they are reported beside it.

Symbolic dims that ``bind`` does not fix count as 1: sizes are then per unit of each such symbol
(``Program.symbols`` names them) and nothing fails. A tensor whose shape stays unknown counts as
0 bytes and is listed in ``Program.unknown``.

Plans follow Pisarchyk & Lee, "Efficient Memory Management for Deep Neural Net Inference" (2020):
greedy by size, each buffer at the best-fitting gap among the buffers live at the same time (as
TFLite's arena planner does), offsets aligned to ``ALIGNMENT``. An elementwise op writes over an
input that dies at it when both have the same size (``INPLACE_OPS``): the two share one buffer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import onnx

from . import ir
from .errors import CompileError

ALIGNMENT = 64

# Ops whose output may take the place of an input of the same size that dies at the op:
# elementwise math and activations, and the ops that only relabel the shape (ORT aliases those).
INPLACE_OPS = frozenset("""
    Abs Acos Acosh Add And Asin Asinh Atan Atanh BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Cast Ceil Celu Clip
    Cos Cosh Div Elu Equal Erf Exp Flatten Floor Gelu Greater GreaterOrEqual HardSigmoid HardSwish Identity
    IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Min Mish Mod Mul Neg Not Or Pow PRelu Reciprocal Relu
    Reshape Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Unsqueeze Where Xor
""".split())


@dataclass(frozen=True)
class Op:
    name: str
    op_type: str
    reads: tuple[str, ...]  # distinct names read, outer-scope reads of subgraphs included
    writes: tuple[str, ...]
    scratch: int = 0  # bytes its subgraphs need while it runs


@dataclass
class Program:
    ops: list[Op]
    sizes: dict[str, int]  # arena tensors (intermediates and outputs) -> bytes
    outputs: frozenset[str]
    input_bytes: int = 0
    weight_bytes: int = 0
    symbols: list[str] = field(default_factory=list)  # unbound symbolic dims, counted as 1
    unknown: list[str] = field(default_factory=list)  # tensors of unknown shape, counted as 0 bytes

    def identity(self) -> list[int]:
        return list(range(len(self.ops)))


# ----------------------------------------------------------------------------- model -> program


def program_of(model: onnx.ModelProto, bind: dict[str, Sequence[int]] | None = None) -> Program:
    """The top-level schedule of ``model`` with byte sizes; ``bind`` maps input names to shapes
    (as ``--input-shape``)."""
    from .analysis import skeleton

    bound, symbols = _bind_inputs(skeleton(model), bind or {})  # shapes only: large weights left out
    shapes = _all_shapes(bound)
    symbols.extend(sorted({d for dims in shapes.values() for d in dims[1] if isinstance(d, str)} - set(symbols)))
    unknown: list[str] = []
    return _program(model.graph, shapes, symbols, unknown)


def _bind_inputs(m: onnx.ModelProto, bind: dict[str, Sequence[int]]) -> tuple[onnx.ModelProto, list[str]]:
    """``m`` with its input dims fixed: from ``bind``, else symbols and unknown dims as 1."""
    values: dict[str, int] = {}
    for vi in m.graph.input:
        given = bind.get(vi.name)
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if given is not None and i < len(given) and d.dim_param:
                values[d.dim_param] = int(given[i])
    symbols: list[str] = []
    for vi in m.graph.input:
        given = bind.get(vi.name)
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if given is not None and i < len(given):
                value = int(given[i])
            else:
                value = values.get(d.dim_param, 1)
                if d.dim_param not in values:
                    name = d.dim_param or f"{vi.name}[{i}]"
                    if name not in symbols:
                        symbols.append(name)
            d.Clear()
            d.dim_value = value
    return m, symbols


def _all_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """name -> (onnx dtype, dims) for every value of every graph whose type is known; a dim is
    an int, or a str (a symbol or '?') where inference left it open."""
    from .analysis import _infer_static_shapes

    inferred, _ = _infer_static_shapes(model)
    shapes: dict[str, tuple[int, tuple]] = {}
    for g in ir.iter_graphs(inferred.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
            shapes.setdefault(vi.name, (tt.elem_type, dims))
    return shapes


def _nbytes(entry: tuple[int, tuple] | None) -> int | None:
    if entry is None:
        return None
    itemsize = ir._itemsize(entry[0])
    if itemsize is None:
        return None
    return itemsize * math.prod(d if isinstance(d, int) else 1 for d in entry[1])


def _program(g: onnx.GraphProto, shapes: dict, symbols: list[str], unknown: list[str]) -> Program:
    weights = {t.name for t in g.initializer}
    weight_bytes = sum(ir._tensor_nbytes(t) or 0 for t in g.initializer)
    inputs = {vi.name for vi in g.input} - weights
    input_bytes = sum(_nbytes(shapes.get(name)) or 0 for name in inputs)
    ops: list[Op] = []
    sizes: dict[str, int] = {}
    for k, node in enumerate(g.node):
        subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        subgraphs += [s for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for s in a.graphs]
        scratch = 0
        for sub in subgraphs:
            inner = _program(sub, shapes, symbols, unknown)
            weight_bytes += inner.weight_bytes
            scratch = max(scratch, inner.input_bytes + plan_memory(inner).planned)
        reads = list(dict.fromkeys(ir._node_inputs(node)))
        writes = tuple(o for o in node.output if o)
        ops.append(Op(node.name or f"{node.op_type}_{k}", node.op_type, tuple(reads), writes, scratch))
        for o in writes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                weight_bytes += _nbytes(shapes.get(o)) or 0
                weights.add(o)
                continue
            size = _nbytes(shapes.get(o))
            if size is None:
                unknown.append(o)
                size = 0
            sizes[o] = size
    outputs = frozenset(o.name for o in g.output if o.name in sizes)
    return Program(ops, sizes, outputs, input_bytes, weight_bytes, symbols, unknown)


# ----------------------------------------------------------------------------- liveness


@dataclass
class Buffer:
    """One arena allocation: a tensor and those written in place over it, live over [start, end]."""

    tensors: list[str]
    size: int
    start: int
    end: int
    starts: list[int] = field(default_factory=list)  # step at which each of ``tensors`` is written

    def tensor_at(self, step: int) -> str:
        return next(t for t, s in zip(reversed(self.tensors), reversed(self.starts)) if s <= step)


def buffers(prog: Program, order: Sequence[int], inplace: bool = True) -> list[Buffer]:
    """The arena buffers of ``order`` (op indices), in order of first use. Each op with scratch
    gets a buffer ``NAME#scratch`` live at its step only."""
    n = len(order)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for step, i in enumerate(order):
        op = prog.ops[i]
        for w in op.writes:
            if w in prog.sizes:
                start[w] = end[w] = step
        for r in op.reads:
            if r in end:
                end[r] = max(end[r], step)
    for o in prog.outputs:
        end[o] = max(n - 1, start[o])
    owner: dict[str, Buffer] = {}
    result: list[Buffer] = []
    for step, i in enumerate(order):
        op = prog.ops[i]
        if op.scratch:
            result.append(Buffer([f"{op.name}#scratch"], op.scratch, step, step, [step]))
        for w in op.writes:
            if w not in prog.sizes:
                continue
            host = _inplace_host(prog, op, w, step, end, owner) if inplace else None
            if host is not None:
                host.tensors.append(w)
                host.starts.append(step)
                host.end = max(host.end, end[w])
            else:
                host = Buffer([w], prog.sizes[w], start[w], end[w], [step])
                result.append(host)
            owner[w] = host
    return result


def _inplace_host(prog: Program, op: Op, w: str, step: int, end: dict, owner: dict) -> Buffer | None:
    if op.op_type not in INPLACE_OPS or len(op.writes) != 1 or prog.sizes[w] == 0:
        return None
    for r in op.reads:
        buf = owner.get(r)
        if (buf is not None and r not in prog.outputs and end[r] == step and buf.end == step
                and buf.tensors[-1] == r and prog.sizes[r] == prog.sizes[w]):
            return buf
    return None


def live_bytes(bufs: Sequence[Buffer], steps: int) -> list[int]:
    """Bytes live at every step of the schedule."""
    delta = [0] * (steps + 1)
    for b in bufs:
        delta[b.start] += b.size
        delta[b.end + 1] -= b.size
    out, total = [], 0
    for d in delta[:steps]:
        total += d
        out.append(total)
    return out


def lower_bound(prog: Program, order: Sequence[int] | None = None) -> int:
    """The most bytes live at any step of ``order``: no plan of this schedule needs less."""
    order = prog.identity() if order is None else order
    return max(live_bytes(buffers(prog, order), len(order)), default=0)


# ----------------------------------------------------------------------------- offsets


@dataclass
class Plan:
    order: list[int]
    buffers: list[Buffer]
    offsets: list[int]  # per buffer
    alignment: int = ALIGNMENT

    @property
    def planned(self) -> int:
        return max((o + _aligned(b.size, self.alignment) for o, b in zip(self.offsets, self.buffers)), default=0)


def _aligned(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


# Orders in which buffers take their offsets. Greedy by size places the largest first; among
# equal sizes, the longest-lived first packed ViT-Ti's token tensors at its lower bound where the
# earliest first left one slot to fragmentation (+11%). Each is tried; the smallest arena wins.
_PLACEMENT_KEYS = (
    lambda b, k: (-b.size, b.start, k),
    lambda b, k: (-b.size, b.start - b.end, k),
    lambda b, k: (-b.size * (b.end - b.start + 1), k),
)
# Rounds of "squeaky wheel" repair per placement order: the buffers that end at the top of the
# arena move forward in the order (by a tenth of it) and everything is placed again. ViT-Ti after
# -O2 went from 1.10x its lower bound to 1.00x in 13 to 21 rounds (0.2 s).
# Each round costs time quadratic in the buffers: graphs of over ~300 get fewer rounds.
REPAIR_ROUNDS = 32
REPAIR_BUDGET = 3_000_000  # rounds x buffers^2


def plan_memory(prog: Program, order: Sequence[int] | None = None, alignment: int = ALIGNMENT) -> Plan:
    """Offsets in one arena for the buffers of ``order``: greedy by size, best fit, from each
    placement order of ``_PLACEMENT_KEYS`` repaired for ``REPAIR_ROUNDS``; the smallest arena."""
    order = prog.identity() if order is None else list(order)
    bufs = buffers(prog, order)
    sizes = [_aligned(b.size, alignment) for b in bufs]
    floor = max(live_bytes([Buffer([], z, b.start, b.end) for z, b in zip(sizes, bufs)], len(order)), default=0)
    best: Plan | None = None
    for key in _PLACEMENT_KEYS:
        ranked = sorted(range(len(bufs)), key=lambda k: key(bufs[k], k))
        for _ in range(max(1, min(REPAIR_ROUNDS, REPAIR_BUDGET // max(1, len(bufs) ** 2)))):
            plan = Plan(order, bufs, _best_fit(bufs, ranked, alignment), alignment)
            arena = plan.planned
            if best is None or arena < best.planned:
                best = plan
            if best.planned <= floor:
                return best
            step = max(1, len(ranked) // 10)
            for k in [k for k in range(len(bufs)) if plan.offsets[k] + sizes[k] == arena]:
                i = ranked.index(k)
                ranked.insert(max(0, i - step), ranked.pop(i))
    return best


def _best_fit(bufs: list[Buffer], ranked: list[int], alignment: int) -> list[int]:
    """Each buffer in ``ranked`` order at the smallest gap that holds it among the buffers
    placed before it and live at the same time, else above them all."""
    offsets = [0] * len(bufs)
    placed: list[int] = []
    for k in ranked:
        b = bufs[k]
        size = _aligned(b.size, alignment)
        if size == 0:
            continue
        overlapping = sorted((offsets[j], _aligned(bufs[j].size, alignment)) for j in placed
                             if bufs[j].start <= b.end and b.start <= bufs[j].end)
        best, best_gap, prev = None, None, 0
        for off, sz in overlapping:
            gap = off - prev
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = prev, gap
            prev = max(prev, off + sz)
        offsets[k] = prev if best is None else best
        placed.append(k)
    return offsets


def plan_conflicts(plan: Plan) -> list[str]:
    """What is wrong with a plan: overlapping buffers live at the same time, misaligned offsets."""
    problems = [f"{b.tensors[0]} at offset {o} is not {plan.alignment}-byte aligned"
                for o, b in zip(plan.offsets, plan.buffers) if o % plan.alignment]
    steps = len(plan.order)
    live_at: list[list[int]] = [[] for _ in range(steps)]
    for k, b in enumerate(plan.buffers):
        if b.size:
            for s in range(b.start, b.end + 1):
                live_at[s].append(k)
    seen: set[tuple[int, int]] = set()
    for s, ks in enumerate(live_at):
        ks = sorted(ks, key=lambda k: plan.offsets[k])
        for a, c in zip(ks, ks[1:]):
            if plan.offsets[a] + plan.buffers[a].size > plan.offsets[c] and (a, c) not in seen:
                seen.add((a, c))
                problems.append(f"{plan.buffers[a].tensors[0]} and {plan.buffers[c].tensors[0]} overlap "
                                f"while both are live (step {s})")
    return problems


def check_plan(plan: Plan) -> None:
    problems = plan_conflicts(plan)
    if problems:
        raise CompileError(f"invalid memory plan: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                    if len(problems) > 1 else ""))


# ----------------------------------------------------------------------------- report


@dataclass
class MemoryReport:
    steps: int
    no_reuse: int  # every arena tensor its own buffer
    planned: int  # the arena of the plan
    lower_bound: int  # most bytes live at one step
    weights: int
    inputs: int
    peak_step: int
    peak_node: str
    live_at_peak: list[tuple[str, int]]  # (tensor, bytes), largest first
    live: list[int]  # bytes live per step
    symbols: list[str]
    unknown: list[str]
    plan: Plan

    def as_dict(self, with_live: bool = True) -> dict:
        out = {k: getattr(self, k) for k in ("steps", "no_reuse", "planned", "lower_bound", "weights", "inputs",
                                               "peak_step", "peak_node", "symbols", "unknown")}
        out["alignment"] = self.plan.alignment
        out["live_at_peak"] = [{"tensor": t, "bytes": b} for t, b in self.live_at_peak]
        if with_live:
            out["live"] = self.live
        return out


def report(prog: Program, order: Sequence[int] | None = None) -> MemoryReport:
    """The plan of ``order`` (checked) and the figures around it."""
    plan = plan_memory(prog, order)
    check_plan(plan)
    live = live_bytes(plan.buffers, len(plan.order))
    peak_step = max(range(len(live)), key=lambda s: (live[s], -s)) if live else 0
    at_peak = sorted(((b.tensor_at(peak_step), b.size) for b in plan.buffers if b.start <= peak_step <= b.end),
                     key=lambda tb: (-tb[1], tb[0]))
    return MemoryReport(
        steps=len(plan.order),
        no_reuse=sum(prog.sizes.values()) + sum(op.scratch for op in prog.ops),
        planned=plan.planned,
        lower_bound=max(live, default=0),
        weights=prog.weight_bytes,
        inputs=prog.input_bytes,
        peak_step=peak_step,
        peak_node=prog.ops[plan.order[peak_step]].name if plan.order else "",
        live_at_peak=at_peak,
        live=live,
        symbols=list(prog.symbols),
        unknown=list(prog.unknown),
        plan=plan,
    )


def memory_report(model: onnx.ModelProto, bind: dict[str, Sequence[int]] | None = None) -> MemoryReport:
    """The report of ``model`` in its own node order."""
    return report(program_of(model, bind))


METADATA_KEY = "infoptc.memory_plan"


def metadata_value(rep: MemoryReport) -> str:
    """The plan as compact JSON for a model's metadata_props: arena figures, and per buffer its
    offset, size and tensors (in first-use order); the node order is the model's own."""
    plan = rep.plan
    return json.dumps({
        "alignment": plan.alignment, "arena": rep.planned, "lower_bound": rep.lower_bound,
        "symbols": rep.symbols,
        "buffers": [[o, b.size, b.tensors] for o, b in zip(plan.offsets, plan.buffers)],
    }, separators=(",", ":"), sort_keys=True)


# ----------------------------------------------------------------------------- schedules


def best_order(prog: Program, exact_max_nodes: int = 20, exact_max_states: int = 20000) -> list[int]:
    """A topological order with the lowest lower bound found: the given order, two greedy
    orders, and each of them refined by exact search on its small regions. Ties keep the given
    order, so the result never has a higher lower bound than the input order."""
    candidates = [prog.identity(), _greedy(prog, "delta"), _greedy(prog, "depth")]
    refined = [_refine(prog, c, exact_max_nodes, exact_max_states) for c in candidates]
    best = candidates[0]
    best_lb = lower_bound(prog, best)
    for order in candidates[1:] + refined:
        lb = lower_bound(prog, order)
        if lb < best_lb:
            best, best_lb = order, lb
    return best


def _consumers(prog: Program) -> tuple[dict[str, int], list[list[int]]]:
    """Per arena tensor its producer op, and per op the ops that read what it writes."""
    producer = {w: i for i, op in enumerate(prog.ops) for w in op.writes}
    succ: list[list[int]] = [[] for _ in prog.ops]
    for i, op in enumerate(prog.ops):
        for r in op.reads:
            p = producer.get(r)
            if p is not None and p != i and i not in succ[p]:
                succ[p].append(i)
    return producer, succ


def _greedy(prog: Program, mode: str) -> list[int]:
    """List scheduling: 'delta' runs the ready op that adds the fewest live bytes (output minus
    what it frees); 'depth' the ready op whose inputs were produced last (finishes a branch
    before starting another)."""
    producer, succ = _consumers(prog)
    indeg = [0] * len(prog.ops)
    for s in succ:
        for j in s:
            indeg[j] += 1
    pending = {t: 0 for t in prog.sizes}
    for op in prog.ops:
        for r in op.reads:
            if r in pending:
                pending[r] += 1
    ready = [i for i, d in enumerate(indeg) if d == 0]
    when: dict[str, int] = {}
    order: list[int] = []
    while ready:
        def key(i: int):
            op = prog.ops[i]
            freed = sum(prog.sizes[r] for r in op.reads if r in pending and pending[r] == 1
                        and r not in prog.outputs)
            grown = sum(prog.sizes.get(w, 0) for w in op.writes)
            if mode == "delta":
                return (grown - freed, grown + op.scratch, i)
            return (-max((when.get(r, -1) for r in op.reads), default=-1), grown - freed, i)
        pick = min(ready, key=key)
        ready.remove(pick)
        order.append(pick)
        op = prog.ops[pick]
        for r in op.reads:
            if r in pending:
                pending[r] -= 1
        for w in op.writes:
            when[w] = len(order)
        for j in succ[pick]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if len(order) != len(prog.ops):
        raise CompileError("the graph has a cycle: no topological order")
    return order


class _TooManyStates(Exception):
    pass


def _refine(prog: Program, order: list[int], max_nodes: int, max_states: int) -> list[int]:
    """``order`` with each block between narrow points (at most one tensor crossing) reordered
    by exact search when it has at most ``max_nodes`` ops: any order of a contiguous block that
    respects the dependencies inside it keeps the whole order topological."""
    producer, _ = _consumers(prog)
    pos = {i: s for s, i in enumerate(order)}
    last = {}
    for s, i in enumerate(order):
        for r in prog.ops[i].reads:
            if r in prog.sizes:
                last[r] = s
    crossing = [0] * (len(order) + 1)  # tensors produced at or before s and read after s
    for t, s_last in last.items():
        s_def = pos[producer[t]]
        if s_last > s_def:
            crossing[s_def] += 1
            crossing[s_last] -= 1
    total, cuts = 0, [-1]
    for s in range(len(order)):
        total += crossing[s]
        if total <= 1:
            cuts.append(s)
    if cuts[-1] != len(order) - 1:
        cuts.append(len(order) - 1)
    out: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        block = order[a + 1 : b + 1]
        if 2 < len(block) <= max_nodes:
            try:
                block = _exact(prog, order, a + 1, block, max_states)
            except _TooManyStates:
                pass
        out.extend(block)
    return out


def _exact(prog: Program, order: list[int], first: int, block: list[int], max_states: int) -> list[int]:
    """The order of ``block`` (ops at positions first.. of ``order``) with the lowest peak of
    (live bytes + what the next op writes + its scratch), by search over the sets of ops run."""
    index = {op: k for k, op in enumerate(block)}
    after = set(order[first + len(block):])
    producer, _ = _consumers(prog)
    deps = [0] * len(block)
    writes_mask: dict[str, int] = {}
    for k, i in enumerate(block):
        for r in prog.ops[i].reads:
            p = producer.get(r)
            if p in index and index[p] != k:
                deps[k] |= 1 << index[p]
        for w in prog.ops[i].writes:
            writes_mask[w] = 1 << k
    # Tensors whose liveness depends on the block: (bytes, mask of its producer in the block or 0,
    # mask of its readers in the block, whether it stays live after the block)
    tracked = []
    for t, size in prog.sizes.items():
        readers = 0
        for k, i in enumerate(block):
            if t in prog.ops[i].reads:
                readers |= 1 << k
        made = writes_mask.get(t, 0)
        if not (readers or made) or not size:
            continue
        later = t in prog.outputs or any(t in prog.ops[j].reads for j in after)
        tracked.append((size, made, readers, later))
    out_bytes = [sum(prog.sizes.get(w, 0) for w in prog.ops[i].writes) + prog.ops[i].scratch for i in block]
    full = (1 << len(block)) - 1
    memo: dict[int, tuple[int, int]] = {}

    def live(done: int) -> int:
        return sum(size for size, made, readers, later in tracked
                   if (made & done) == made and (later or readers & ~done))

    def solve(done: int) -> tuple[int, int]:
        if done == full:
            return 0, -1
        if done in memo:
            return memo[done]
        if len(memo) >= max_states:
            raise _TooManyStates
        base = live(done)
        best = (None, -1)
        for k in range(len(block)):
            bit = 1 << k
            if done & bit or (deps[k] & done) != deps[k]:
                continue
            peak = max(base + out_bytes[k], solve(done | bit)[0])
            if best[0] is None or peak < best[0]:
                best = (peak, k)
        memo[done] = best
        return best

    solve(0)
    result, done = [], 0
    while done != full:
        k = memo[done][1]
        result.append(block[k])
        done |= 1 << k
    return result


def plot_live_bytes(rep: MemoryReport, path, title: str = "") -> None:
    """A figure of the bytes live at each step, with the lower bound and the planned arena;
    written atomically in the format of ``path``'s suffix."""
    from .plotting import figure

    with figure(path, figsize=(9, 3.5)) as (_, ax):
        steps = list(range(rep.steps))
        ax.fill_between(steps, [b / 1e6 for b in rep.live], step="mid", alpha=0.4, label="live")
        ax.axhline(rep.planned / 1e6, color="C3", lw=1, label=f"planned arena {rep.planned / 1e6:.2f} MB")
        ax.axhline(rep.lower_bound / 1e6, color="C2", lw=1, ls="--",
                   label=f"lower bound {rep.lower_bound / 1e6:.2f} MB")
        ax.set_xlabel("step (node in schedule order)")
        ax.set_ylabel("MB live")
        ax.set_title(title or "activation memory over the schedule", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
