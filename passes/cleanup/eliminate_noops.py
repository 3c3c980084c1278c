"""eliminate-noops: remove ops that pass their input through unchanged.

Removed (each only where dtypes and shapes prove the output equals the input, element for
element; shapes come from shape inference, so a symbolic dimension is never assumed):

* Identity; Dropout at inference (its mask unused); Cast / CastLike to the type it already has;
* Reshape / Flatten to the shape the input already has; Transpose with the identity permutation;
* Pad by zeros; Slice that keeps every element; Concat of a single input; Expand to a shape
  that broadcasting leaves unchanged;
* Mul by 1 and Div by 1 (exact, -0.0 included), Add of -0.0 and Sub of +0.0 (exact too), Add
  of +0.0 and Sub of -0.0 only with ``no-signed-zeros=true`` (they turn -0.0 into +0.0);
  integer Add/Sub of 0 always. The constant must not change the output's shape by broadcasting;
* Squeeze(Unsqueeze(x)) and Unsqueeze(Squeeze(x)) over the same axes.

Rewired rather than removed: a Reshape whose input comes from another Reshape (or Flatten,
Squeeze, Unsqueeze) reads that op's input directly, since the result of a Reshape without 0 in
its shape depends only on the element order; the op in between dies if nothing else uses it.

Ops the pass does not know are left alone. Subgraphs are visited; a node whose output leaves a
subgraph is removed only when its input is produced inside that subgraph, so outer-scope
references stay intact. Contract: ``exact``, or ``reassociating`` with ``no-signed-zeros``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Detacher, bypass, constant_value, graphs_of, is_standard, numpy_dtype, overridable

INT64_MAX = np.iinfo(np.int64).max
# A Slice end at least this large means "to the end" whatever the (symbolic) dimension.
SLICE_TO_END = 2**31 - 1


class _Facts:
    """What a check may ask: constant values (overridable initializers excluded) and options."""

    def __init__(self, locked: set[int], no_signed_zeros: bool):
        self.locked = locked
        self.no_signed_zeros = no_signed_zeros

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        if t is None or not t.name:
            return None
        return constant_value(t, self.locked)

    def ints(self, node: gs.Node, index: int, attr: str) -> list[int] | None:
        """An int list given as input ``index`` (newer opsets) or attribute ``attr`` (older)."""
        if len(node.inputs) > index and node.inputs[index].name:
            value = self.const(node.inputs[index])
            return None if value is None else [int(v) for v in value.reshape(-1)]
        value = node.attrs.get(attr)
        return None if value is None else [int(v) for v in value]


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def _dim(t: gs.Tensor, i: int):
    d = t.shape[i]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Both shapes fully static and equal."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(_dim(a, i) is not None and _dim(a, i) == _dim(b, i) for i in range(len(a.shape)))


def _keeps_shape(x: gs.Tensor, shape: tuple) -> bool:
    """Broadcasting ``x`` with a tensor of ``shape`` leaves ``x``'s shape as it is."""
    if len(shape) == 0:
        return True
    rank = _rank(x)
    if rank is None or len(shape) > rank:
        return False
    return all(d == 1 or d == _dim(x, rank - len(shape) + k) for k, d in enumerate(shape))


def _same_dtype(x: gs.Tensor, c: np.ndarray) -> bool:
    dtype = numpy_dtype(x)
    return dtype is not None and dtype == c.dtype


# ----------------------------------------------------------------------------- checks
# Each check returns the tensor the node's output equals, or None.


def _identity(node, f):
    return node.inputs[0]


def _dropout(node, f):
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return None  # the mask is used
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = f.const(node.inputs[2])
        return node.inputs[0] if training is not None and not training.any() else None
    return node.inputs[0]


def _cast(node, f):
    src = numpy_dtype(node.inputs[0])
    try:
        to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    except (KeyError, TypeError, ValueError):
        return None
    return node.inputs[0] if src is not None and src == to else None


def _cast_like(node, f):
    src, like = numpy_dtype(node.inputs[0]), numpy_dtype(node.inputs[1])
    return node.inputs[0] if src is not None and src == like else None


def _reshape(node, f):
    x, out = node.inputs[0], node.outputs[0]
    if _same_shape(x, out):
        return x
    target = f.const(node.inputs[1]) if len(node.inputs) > 1 else None
    rank = _rank(x)
    if target is None or rank is None or target.ndim != 1 or len(target) != rank:
        return None
    allowzero = node.attrs.get("allowzero", 0)
    unresolved = 0
    for i, t in enumerate(int(v) for v in target):
        if t == 0 and not allowzero:
            continue  # 0 copies the input's dimension
        if t == -1:
            unresolved += 1  # inferred from the element count: then it must be x's own dim
            continue
        if _dim(x, i) != t:
            return None
    return x if unresolved <= 1 else None


def _flatten(node, f):
    x = node.inputs[0]
    axis = node.attrs.get("axis", 1)
    if _rank(x) == 2 and axis in (1, -1):
        return x
    return x if _same_shape(x, node.outputs[0]) else None


def _transpose(node, f):
    x = node.inputs[0]
    perm = node.attrs.get("perm")
    if perm is None:
        return x if _rank(x) is not None and _rank(x) <= 1 else None
    return x if list(perm) == list(range(len(perm))) else None


def _pad(node, f):
    pads = f.ints(node, 1, "pads")
    return node.inputs[0] if pads is not None and not any(pads) else None


def _mul(node, f):
    for k in (0, 1):
        x, c = node.inputs[1 - k], f.const(node.inputs[k])
        if c is not None and _same_dtype(x, c) and _keeps_shape(x, c.shape) and (c == 1).all():
            return x
    return None


def _div(node, f):
    x, c = node.inputs[0], f.const(node.inputs[1])
    if c is not None and _same_dtype(x, c) and _keeps_shape(x, c.shape) and (c == 1).all():
        return x
    return None


def _zero_keeps(c: np.ndarray, keep_sign: bool, f: _Facts) -> bool:
    """``x + c == x`` (``keep_sign``: c must be -0.0) or ``x - c == x`` (c must be +0.0)."""
    if not (c == 0).all():
        return False
    if c.dtype.kind != "f" or f.no_signed_zeros:
        return True
    negative = np.signbit(c)
    return bool(negative.all() if keep_sign else not negative.any())


def _add(node, f):
    for k in (0, 1):
        x, c = node.inputs[1 - k], f.const(node.inputs[k])
        if c is not None and _same_dtype(x, c) and _keeps_shape(x, c.shape) and _zero_keeps(c, True, f):
            return x
    return None


def _sub(node, f):
    x, c = node.inputs[0], f.const(node.inputs[1])
    if c is not None and _same_dtype(x, c) and _keeps_shape(x, c.shape) and _zero_keeps(c, False, f):
        return x
    return None


def _slice(node, f):
    x = node.inputs[0]
    rank = _rank(x)
    starts, ends = f.ints(node, 1, "starts"), f.ints(node, 2, "ends")
    if rank is None or starts is None or ends is None:
        return None
    axes = f.ints(node, 3, "axes") if len(node.inputs) > 3 or "axes" in node.attrs else list(range(len(starts)))
    steps = f.ints(node, 4, "steps") if len(node.inputs) > 4 else [1] * len(starts)
    if axes is None or steps is None or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = _dim(x, axis % rank) if -rank <= axis < rank else None
        if step != 1 or start != 0 or not (end >= SLICE_TO_END or (dim is not None and end >= dim)):
            return None
    return x


def _concat(node, f):
    return node.inputs[0] if len(node.inputs) == 1 else None


def _expand(node, f):
    x, shape = node.inputs[0], f.const(node.inputs[1])
    if shape is None or shape.ndim != 1:
        return None
    return x if _keeps_shape(x, tuple(int(d) for d in shape)) else None


def _axes(node: gs.Node, f: _Facts, rank: int | None) -> set[int] | None:
    axes = f.ints(node, 1, "axes")
    if axes is None:
        return None
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a % rank for a in axes]
    return set(axes)


def _squeeze(node, f):
    """Squeeze(Unsqueeze(x, a), a) == x."""
    inner = _producer(node.inputs[0])
    if inner is None or inner.op != "Unsqueeze" or not is_standard(inner):
        return None
    rank = _rank(node.inputs[0])  # the rank both axes lists refer to
    a, b = _axes(inner, f, rank), _axes(node, f, rank)
    return inner.inputs[0] if a is not None and a == b else None


def _unsqueeze(node, f):
    """Unsqueeze(Squeeze(x, a), a) == x: Squeeze only removes size-1 dims, Unsqueeze restores them."""
    inner = _producer(node.inputs[0])
    if inner is None or inner.op != "Squeeze" or not is_standard(inner):
        return None
    rank = _rank(node.outputs[0]) or _rank(inner.inputs[0])
    a, b = _axes(inner, f, rank), _axes(node, f, rank)
    return inner.inputs[0] if a is not None and a == b else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


NOOPS: dict[str, Callable[[gs.Node, _Facts], gs.Tensor | None]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Pad": _pad,
    "Mul": _mul,
    "Div": _div,
    "Add": _add,
    "Sub": _sub,
    "Slice": _slice,
    "Concat": _concat,
    "Expand": _expand,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}

# Ops that only reorder the view of their input: a Reshape after them can read their input.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _collapse_reshape(node: gs.Node, f: _Facts) -> bool:
    """Reshape(view(x), s) -> Reshape(x, s) when s has no 0 (which would copy a dim of view(x))."""
    if len(node.inputs) < 2:
        return False
    inner = _producer(node.inputs[0])
    if inner is None or inner.op not in VIEW_OPS or not is_standard(inner) or not inner.inputs:
        return False
    target = f.const(node.inputs[1])
    if target is None or ((target == 0).any() and not node.attrs.get("allowzero", 0)):
        return False
    node.inputs[0] = inner.inputs[0]
    return True


# ----------------------------------------------------------------------------- the pass


@register_pass
class EliminateNoops(Pass):
    name = "eliminate-noops"
    summary = "remove ops that return their input: Identity, same-type Cast, x*1, no-op Reshape/Transpose/Slice..."
    contract = Contract.EXACT
    reports_changes = True
    options = {
        "no-signed-zeros": Option(False, "also drop x+0.0 and x-(-0.0), which turn -0.0 into +0.0 "
                                         "(contract reassociating)"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["no-signed-zeros"]:
            self.contract = Contract.REASSOCIATING

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters: Counter = Counter()
        graphs = graphs_of(graph, ctx)
        facts = _Facts(overridable(graphs), self.opts["no-signed-zeros"])
        detacher = Detacher()  # removed nodes are unhooked from their inputs once, at the end
        for g in graphs:
            for node in list(g.nodes):
                if not node.inputs or not node.outputs or not is_standard(node):
                    continue
                check = NOOPS.get(node.op)
                src = _safe(check, node, facts) if check else None
                # bypass refuses where the output leaves this graph and src cannot take its name
                # over (an outer-scope value, an input, a constant or another output)
                if src is not None and _mask_unread(node) and bypass(g, node, src, detacher=detacher):
                    counters[f"removed_{node.op.lower()}"] += 1
                elif node.op == "Reshape" and _collapse_reshape(node, facts):
                    counters["collapsed_reshapes"] += 1
        detacher.flush()
        return PassResult(changed=bool(counters), counters=dict(counters))


def _mask_unread(node: gs.Node) -> bool:
    """No output but the first (Dropout's mask) is still read."""
    return not any(o.name and o.outputs for o in node.outputs[1:])


def _safe(check, node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    try:
        return check(node, facts)
    except (IndexError, KeyError, TypeError, ValueError):
        return None  # a malformed node: not ours to judge
