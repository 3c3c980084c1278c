"""fuse-attention-mask: a padding mask built into an additive bias -> the 2-D mask ORT's Attention takes.

    C = Cast(attention_mask, bool)                                     [B, T]
    G = Reshape(Gather(Flatten(C), b * T + j))                          [B, 1, 1, T], = C[b, j]
    bias = Expand(Where(And(G, <always true>), 0, m), [B, N, S, T])
    Attention(x, W, b, attention_bias=bias)
        ->  Attention(x, W, b, mask_index=Cast(C, int32), mask_filter_value=m)

transformers 5 builds the padding mask of its encoders (BERT, MiniLM, RoBERTa, DistilBERT) with
vmapped index functions, which the TorchScript exporter writes as that index arithmetic over
the flattened mask (about 40 nodes before the first layer, and an Expand per layer). ONNX
Runtime's Attention takes the [B, T] mask itself (``mask_index``, 0 = masked) and adds
``mask_filter_value`` to the masked scores, which is what the bias did. Every step is proved
from the graph, not assumed: the gather index is ``b * T + j`` with ``b`` a Range over the
first axis and ``j`` a Range over the last, ``T`` the mask's second dimension, and the
other And operands are true by construction (constants, ``Range(k >= 0) >= 0``). A bias that
is anything else (a causal or sliding-window mask, a position bias) stays, and ``--stats``
says which step did not hold. Only where the op policy allows contrib ops (``--ops ort``, the
onnx target); the standard form (``--ops standard``) is left as exported, which is correct.
Runs after fuse-qkv-projection, which makes the Attention.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.op_policy import contrib_allowed
from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass
from infoptc.pattern import attr_value, constant_value
from infoptc.rewrite import cleanup

MS = "com.microsoft"
BOOL = np.dtype(bool)


class _No(Exception):
    """A step of the proof that does not hold; the message says which."""


def _producer(t: gs.Tensor, op: str | tuple[str, ...] | None = None) -> gs.Node:
    node = t.inputs[0] if len(t.inputs) == 1 else None
    ops = (op,) if isinstance(op, str) else op
    if node is None or (ops is not None and node.op not in ops):
        raise _No(f"{t.name!r} is not computed by {'/'.join(ops) if ops else 'a node'}")
    return node


def _const(t: gs.Tensor) -> np.ndarray:
    value = constant_value(t)
    if value is None:
        raise _No(f"{t.name!r} is not a constant")
    return value


def _peel(t: gs.Tensor, ops: tuple[str, ...]) -> gs.Tensor:
    while len(t.inputs) == 1 and t.inputs[0].op in ops:
        t = t.inputs[0].inputs[0]
    return t


def _unsqueeze_axes(node: gs.Node, opset: int) -> list[int]:
    if len(node.inputs) > 1:
        return [int(a) for a in _const(node.inputs[1]).reshape(-1)]
    return [int(a) for a in attr_value(node, "axes", opset, [])]


def _unsqueezed(t: gs.Tensor, opset: int, rank: int) -> tuple[gs.Tensor, list[int]]:
    """``t`` = Unsqueeze*(x) for an x of ``rank``: x, and the axes x's axes end up on."""
    chain = []
    while len(t.inputs) == 1 and t.inputs[0].op == "Unsqueeze":
        chain.append(t.inputs[0])
        t = t.inputs[0].inputs[0]
    positions = list(range(rank))
    for node in reversed(chain):  # innermost first
        axes = _unsqueeze_axes(node, opset)
        rank += len(axes)
        for a in sorted(x % rank for x in axes):
            positions = [p + 1 if p >= a else p for p in positions]
    return t, positions + [rank]


def _placed_range(t: gs.Tensor, opset: int) -> tuple[gs.Node, int, int]:
    """``t`` = Unsqueeze*(Range(0, n, 1)): the Range, the axis its values run along, the rank."""
    src, (axis, rank) = _unsqueezed(t, opset, 1)
    rng = _producer(src, "Range")
    start, step = _const(rng.inputs[0]), _const(rng.inputs[2])
    if start.size != 1 or step.size != 1 or int(start.reshape(-1)[0]) != 0 or int(step.reshape(-1)[0]) != 1:
        raise _No(f"Range {rng.name!r} does not count 0, 1, 2, ...")
    return rng, axis, rank


def _dim_of(t: gs.Tensor, source: gs.Tensor, index: int) -> bool:
    """Whether ``t`` (0-d or [1]) is ``Gather(Shape(source), index)``."""
    try:
        g = _producer(t, "Gather")
        shape = _producer(g.inputs[0], "Shape")
        idx = _const(g.inputs[1])
    except _No:
        return False
    rank = len(source.shape) if source.shape is not None else None
    return (shape.inputs[0] is source and idx.size == 1 and rank is not None
            and int(idx.reshape(-1)[0]) % rank == index and not shape.attrs.get("start", 0))


def _bool_matrix(t: gs.Tensor) -> bool:
    return t.shape is not None and len(t.shape) == 2 and t.dtype is not None and np.dtype(t.dtype) == BOOL


def _always_true(t: gs.Tensor, opset: int, depth: int = 0) -> bool:
    value = constant_value(t)
    if value is not None:
        return value.dtype == BOOL and bool(value.all())
    if depth > 8 or len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op in ("Expand", "Unsqueeze", "Reshape"):
        return _always_true(node.inputs[0], opset, depth + 1)
    if node.op == "And":
        return all(_always_true(i, opset, depth + 1) for i in node.inputs)
    if node.op == "GreaterOrEqual":  # Range(0, n, 1) >= c with c <= 0
        c = constant_value(node.inputs[1])
        try:
            _placed_range(node.inputs[0], opset)
        except _No:
            return False
        return c is not None and c.size == 1 and float(c.reshape(-1)[0]) <= 0
    return False


def _and_leaves(t: gs.Tensor, out: list) -> None:
    if len(t.inputs) == 1 and t.inputs[0].op == "And":
        for i in t.inputs[0].inputs:
            _and_leaves(i, out)
    else:
        out.append(t)


def _padding_mask(cond: gs.Tensor, opset: int) -> gs.Tensor:
    """The bool [B, T] mask C when ``cond`` is C[b, j] at [b, ., ., j] of a rank-4 result, And
    operands that are always true, and broadcasts; raises _No with the step that fails."""
    leaves: list = []
    _and_leaves(_peel(cond, ("Expand",)), leaves)
    rest = [t for t in leaves if not _always_true(t, opset)]
    if len(rest) != 1:
        raise _No(f"the condition has {len(rest)} operands that are not provably true, not one mask gather")
    g = rest[0]
    src, placed = _unsqueezed(g, opset, 2)
    if placed != [0, 1, 2] and _bool_matrix(src):  # mask[:, None, None, :]
        if placed != [0, 3, 4]:
            raise _No(f"{src.name!r} is not unsqueezed to [B, 1, 1, T]")
        return src
    if len(g.inputs) == 1 and g.inputs[0].op == "GatherND":
        return _gather_nd_mask(g.inputs[0], opset)
    # Reshape(Reshape(Gather(F, idx), [-1]), Shape(idx)): the gathered values in idx's shape
    outer = _producer(g, "Reshape")
    gather = _producer(_peel(outer.inputs[0], ("Reshape",)), "Gather")
    idx = gather.inputs[1]
    target = _producer(outer.inputs[1], "Shape")
    if target.inputs[0] is not idx or target.attrs.get("start", 0) or target.attrs.get("end") is not None:
        raise _No(f"{g.name!r} is not reshaped to its gather index's shape")
    if attr_value(gather, "axis", opset, 0) != 0:
        raise _No(f"Gather {gather.name!r} is not on axis 0")
    flat = _producer(gather.inputs[0], ("Flatten", "Reshape"))
    mask = flat.inputs[0]
    if not _bool_matrix(mask):
        raise _No(f"{mask.name!r} is not a [B, T] bool mask")
    if flat.op == "Flatten" and attr_value(flat, "axis", opset, 1) != 2:
        raise _No(f"Flatten {flat.name!r} does not make [B*T, 1]")
    if flat.op == "Reshape" and [int(d) for d in _const(flat.inputs[1]).reshape(-1)] not in ([-1], [-1, 1]):
        raise _No(f"Reshape {flat.name!r} does not flatten the mask")
    # idx = b * T + j
    add = _producer(idx, "Add")
    for jt, bt in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        try:
            _, j_axis, j_rank = _placed_range(jt, opset)
            mul = _producer(bt, "Mul")
            for rt, tt in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
                if not _dim_of(tt, mask, 1):
                    continue
                _, b_axis, b_rank = _placed_range(rt, opset)
                j_rng = _placed_range(jt, opset)[0]
                if not _dim_of(j_rng.inputs[1], mask, 1):
                    raise _No(f"Range {j_rng.name!r} does not run over the mask's second dimension")
                if (j_rank, j_axis, b_rank, b_axis) != (4, 3, 4, 0):
                    raise _No("the index does not put the batch on axis 0 and the key on axis 3")
                return mask
        except _No:
            continue
    raise _No(f"gather index {idx.name!r} is not b * T + j over the mask's dimensions")


def _gather_nd_mask(node: gs.Node, opset: int) -> gs.Tensor:
    """GatherND(C, stack([b, j], -1)) as the dynamo exporter writes mask[b, j]: b a Range over
    axis 0 and j a Range over axis 3 of a rank-4 index, each broadcast by Expand."""
    mask, idx = node.inputs[0], node.inputs[1]
    if not _bool_matrix(mask) or node.attrs.get("batch_dims", 0) != 0:
        raise _No(f"GatherND {node.name!r} does not index a [B, T] bool mask")
    cat = _producer(idx, "Concat")
    if len(cat.inputs) != 2 or node_axis(cat, opset, 5) != 4:
        raise _No(f"Concat {cat.name!r} does not stack two index tensors on the last axis")
    placed = []
    for part in cat.inputs:
        unsq = _producer(part, "Unsqueeze")
        if [a % 5 for a in _unsqueeze_axes(unsq, opset)] != [4]:
            raise _No(f"Unsqueeze {unsq.name!r} does not add the last axis")
        _, axis, rank = _placed_range(_peel(unsq.inputs[0], ("Expand",)), opset)
        placed.append((axis, rank))
    if placed != [(0, 4), (3, 4)]:
        raise _No("the index does not put the batch on axis 0 and the key on axis 3")
    return mask


def node_axis(node: gs.Node, opset: int, rank: int) -> int:
    return int(attr_value(node, "axis", opset, 0)) % rank


def mask_of_bias(bias: gs.Tensor, opset: int) -> tuple[gs.Tensor, float]:
    """(C, m) when ``bias`` = broadcasts of Where(cond, 0, m) with cond = C[b, j] (see module)."""
    where = _producer(_peel(bias, ("Expand",)), "Where")
    zero, fill = _const(where.inputs[1]), _const(where.inputs[2])
    if zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0 or fill.size != 1:
        raise _No(f"Where {where.name!r} does not choose between 0 and one constant")
    m = float(fill.reshape(-1)[0])
    if not np.isfinite(m) or m > -1e4:
        raise _No(f"the masked value {m} is not a large finite negative number")
    return _padding_mask(where.inputs[0], opset), m


@register_pass
class FuseAttentionMask(Pass):
    name = "fuse-attention-mask"
    summary = "padding mask built as an attention bias -> the [B, T] mask_index of com.microsoft Attention (--ops ort)"
    contract = Contract.REASSOCIATING
    reports_changes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters = Counter({"fused": 0})
        reasons = {}
        if not contrib_allowed(ctx):
            return PassResult(changed=False, counters=dict(counters))
        int_masks: dict[int, gs.Variable] = {}
        for node in list(graph.nodes):
            ins = node.inputs
            if node.op != "Attention" or node.domain != MS or len(ins) < 6 or not ins[5].name:
                continue
            if any(i.name for i in (*ins[3:5], *ins[6:])) or "mask_filter_value" in node.attrs:
                continue
            try:
                mask, fill = mask_of_bias(ins[5], ctx.opset)
            except _No as e:
                counters["rejected"] += 1
                reasons.setdefault("attention_mask", f"at {node.name!r}: {e}")
                continue
            if id(mask) not in int_masks:
                out = gs.Variable(f"{mask.name}_int32", dtype=np.int32, shape=list(mask.shape))
                graph.nodes.append(gs.Node("Cast", f"{mask.name}/CastInt32", {"to": 6}, [mask], [out]))
                int_masks[id(mask)] = out
            node.inputs = [*ins[:3], int_masks[id(mask)]]
            node.attrs["mask_filter_value"] = fill
            counters["fused"] += 1
        if reasons:
            first = ctx.reports.setdefault(self.name, {}).setdefault("rejected", {})
            for rule, why in reasons.items():
                first.setdefault(rule, why)
        if counters["fused"]:
            cleanup(graph)
        return PassResult(changed=counters["fused"] > 0, counters=dict(counters))
