"""Facts about tensor dimensions that shape inference leaves symbolic: where a dimension comes
from, followed up through the ops that keep it, so two tensors can be proved to share it.

Exporters compute reshape targets from ``Shape`` of some earlier tensor (``Concat(Unsqueeze(
Gather(Shape(h), 0)), ...)``) and ONNX shape inference names the result ``unk__N``; the fusions
need to know that such a dimension is the batch of the tensor they rewrite.
"""

from __future__ import annotations


def dims(ctx, t, depth: int = 0) -> list | None:
    """A 1-D int64 shape tensor as entries: ints, or ("dim", tensor, i) for a dimension of a tensor."""
    value = ctx.value(t)
    if value is not None:
        return [int(d) for d in value.reshape(-1)] if value.ndim <= 1 else None
    node = ctx.producer(t)
    if node is None or depth > 8:
        return None
    if node.op == "Concat":
        parts = [dims(ctx, i, depth + 1) for i in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op == "Unsqueeze":
        scalar = _scalar_dim(ctx, node.inputs[0])
        return None if scalar is None else [scalar]
    if node.op == "Shape":
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        return [("dim", node.inputs[0], i) for i in range(rank)[start:end]]
    if node.op == "Gather" and ctx.attr(node, "axis", 0) == 0:
        whole, idx = dims(ctx, node.inputs[0], depth + 1), ctx.value(node.inputs[1])
        if whole is None or idx is None or idx.ndim != 1:
            return None
        return [whole[int(i)] for i in idx]
    if node.op == "Slice":  # of a shape: constant starts/ends on axis 0, step 1
        whole = dims(ctx, node.inputs[0], depth + 1)
        bounds = [ctx.value(x) if len(node.inputs) > k and x.name else None for k, x in enumerate(node.inputs[1:5], 1)]
        starts, ends, axes, steps = (bounds + [None] * 4)[:4]
        if whole is None or starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        if (axes is not None and int(axes.reshape(-1)[0]) not in (0, -1)) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        return whole[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0])]  # ONNX clamps as Python slicing does
    return None


def _scalar_dim(ctx, t):
    """A 0-d ``Gather(Shape(x), i)`` as ("dim", x, i), or a 0-d constant as an int."""
    value = ctx.value(t)
    if value is not None:
        return int(value) if value.size == 1 else None
    node = ctx.producer(t)
    if node is None or node.op != "Gather" or ctx.attr(node, "axis", 0) != 0:
        return None
    idx, shape = ctx.value(node.inputs[1]), ctx.producer(node.inputs[0])
    if idx is None or idx.ndim != 0 or shape is None or shape.op != "Shape" or shape.attrs.get("start", 0):
        return None
    rank = ctx.rank(shape.inputs[0])
    i = int(idx)
    if i < 0:
        if rank is None:
            return None
        i += rank
    return ("dim", shape.inputs[0], i)


KEEPS_DIMS = {"Add", "Sub", "Mul", "Div", "Cast", "Relu", "Gelu", "Tanh", "Erf", "Sigmoid", "Softmax", "Identity",
              "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
              "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Neg", "Sqrt", "Pow"}


def _same(a, b) -> bool:
    return a[0] is b[0] and a[1] == b[1]


def origin(ctx, t, i, depth: int = 0):
    """See ``_origin``; memoized per match context (one check sees one unchanging graph), which
    keeps the walk linear where a residual stream's every Add has two computed operands."""
    memo = ctx.__dict__.setdefault("_dim_origins", {})
    key = (id(t), i)
    if key not in memo:
        memo[key] = _origin(ctx, t, i, depth)
    return memo[key]


def _origin(ctx, t, i, depth: int = 0):
    """(tensor, axis) where dim ``i`` of ``t`` comes from, followed up through ops that keep it:
    elementwise ops whose other operands are constants of size 1 on that axis (or tensors whose
    dim has the same origin), normalizations, MatMul by a 2-D weight (every axis but the last),
    Transpose, Split along another axis, and Reshape entries read from a Shape or copied by 0."""
    node = ctx.producer(t)
    rank = ctx.rank(t)
    if node is None or rank is None or depth > 32 or not node.inputs:
        return t, i
    src = node.inputs[0]
    if node.op == "Reshape":
        entries = dims(ctx, node.inputs[1])
        if entries is None or len(entries) != rank:
            return t, i
        e = entries[i]
        if isinstance(e, tuple):
            return origin(ctx, e[1], e[2], depth + 1)
        if e == 0 and not ctx.attr(node, "allowzero", 0):
            return origin(ctx, src, i, depth + 1)
        return t, i
    if node.op == "Gather" and ctx.attr(node, "axis", 0) == 0 and ctx.value(src) is not None:
        indices = node.inputs[1]  # an embedding lookup: [*indices.shape, H]
        ri = ctx.rank(indices)
        return origin(ctx, indices, i, depth + 1) if ri is not None and i < ri and rank == ri + ctx.rank(src) - 1 \
            else (t, i)
    if node.op == "Transpose":
        perm = ctx.attr(node, "perm", None)
        return (t, i) if perm is None else origin(ctx, src, int(perm[i]), depth + 1)
    if node.op == "Split" and ctx.attr(node, "axis", 0) % rank != i:
        return origin(ctx, src, i, depth + 1)
    if node.op in ("MultiHeadAttention", "Attention") and ctx.rank(src) == 3 and rank == 3 and i < 2:
        return origin(ctx, src, i, depth + 1)  # [B, S, hidden] of the query
    if node.op == "RotaryEmbedding" and t is node.outputs[0]:
        return origin(ctx, src, i, depth + 1)  # the output has its input's shape
    if node.op == "Where" and len(node.inputs) == 3:  # Where(IsNaN(x), c, x), fuse-attention's NaN guard
        guard, fill = ctx.producer(node.inputs[0]), ctx.value(node.inputs[1])
        if guard is not None and guard.op == "IsNaN" and guard.inputs[0] is node.inputs[2] and fill is not None \
                and fill.size == 1:
            return origin(ctx, node.inputs[2], i, depth + 1)
    if node.op == "MatMul":
        w = ctx.shape(node.inputs[1])
        if ctx.rank(src) != rank or i == rank - 1 or w is None or (len(w) != 2 and i != rank - 2):
            return t, i
        return origin(ctx, src, i, depth + 1)  # the rows of A; every leading dim when B is a 2-D weight
    if node.op in ("Add", "Mul") and len(node.inputs) == 2 and ctx.rank(src) != rank:
        src = node.inputs[1]  # bias + x, as torch writes a Linear's bias: follow the full-rank operand
    if node.op not in KEEPS_DIMS or ctx.rank(src) != rank:
        return t, i
    if t is not node.outputs[0] and not (node.op.startswith("Skip") and len(node.outputs) > 3 and t is node.outputs[3]):
        return t, i  # a normalization's mean / inv-std output is [..., 1]: not the input's shape
    here, there = ctx.shape(t), ctx.shape(src)
    if there[i] == 1 and here[i] != 1:  # broadcast from another operand
        return t, i
    for other in (x for x in node.inputs if x is not src):
        shape = ctx.shape(other) if other.name else ()
        if shape is None:
            return t, i
        k = i - (rank - len(shape))
        if k >= 0 and shape[k] != 1 and (ctx.value(other) is not None or ctx.rank(other) != rank
                                         or not _same(origin(ctx, other, k, depth + 1), origin(ctx, src, i, depth + 1))):
            return t, i
    return origin(ctx, src, i, depth + 1)


def same_dim(ctx, entry, src, i) -> bool:
    """Whether a ("dim", t, j) shape entry provably equals dim ``i`` of ``src``: the same
    dim followed up to where it comes from, or a dim shape inference gave the same symbol."""
    _, t, j = entry
    if _same(origin(ctx, t, j), origin(ctx, src, i)):
        return True
    a, b = ctx.shape(t), ctx.shape(src)
    if not a or not b or j >= len(a) or i >= len(b):
        return False
    da, db = a[j], b[i]
    return da == db and ((isinstance(da, str) and da != "") or (isinstance(da, int) and da > 0))




def same_shape(ctx, a, b) -> bool:
    """Whether tensors ``a`` and ``b`` provably have the same shape (same rank, each dimension
    the same known size, the same symbol, or the same origin)."""
    sa, sb = ctx.shape(a), ctx.shape(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    for i, (x, y) in enumerate(zip(sa, sb)):
        if isinstance(x, int) and isinstance(y, int) and x == y and x >= 0:
            continue
        if not same_dim(ctx, ("dim", a, i), b, i):
            return False
    return True
