"""fuse-matmul-add: MatMul + Add(bias) on 2-D operands -> Gemm.

    Add(MatMul(x, w), b)  ->  Gemm(x, w, b)        x [M, K], w [K, N], b [N], [1, N], [M, N], [M, 1] or scalar

Only where Gemm is legal: both MatMul operands 2-D (Gemm has no batch dimensions) and the bias
unidirectionally broadcastable to [M, N]. The 3-D MatMuls of transformers stay MatMul (ONNX
Runtime fuses those with their bias itself); so do integer MatMuls.
"""

from __future__ import annotations

from infoptc.pattern import Rule, rewrite_pass

GEMM_DTYPES = {"float32", "float64"}


def matmul_add(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def _same_dim(a, b) -> bool:
    return a is not None and a == b and not (isinstance(a, int) and a < 0)


def check(ctx, x, w, b):
    xs, ws, bs = ctx.shape(x), ctx.shape(w), ctx.shape(b)
    if xs is None or ws is None or len(xs) != 2 or len(ws) != 2:
        return "MatMul operands are not both 2-D"
    dtype = ctx.dtype(x)
    if dtype is None or dtype.name not in GEMM_DTYPES or ctx.dtype(b) != dtype:
        return f"dtype {dtype} is not one Gemm runs here"
    if bs is None or len(bs) > 2:
        return "bias shape unknown or of rank > 2"
    m, n = xs[0], ws[1]
    full = (1,) * (2 - len(bs)) + bs
    if not (full[1] == 1 or _same_dim(full[1], n)):
        return f"bias shape {list(bs)} does not broadcast to [M, {n}]"
    if not (full[0] == 1 or _same_dim(full[0], m)):
        return f"bias shape {list(bs)} does not broadcast to [{m}, N]"
    return True


def gemm(op, x, w, b):
    return op.Gemm(x, w, b)


RULES = [Rule("matmul_add", matmul_add, gemm, check)]

FuseMatmulAdd = rewrite_pass(
    "fuse-matmul-add",
    "MatMul + Add(bias) on 2-D operands -> Gemm (3-D transformer MatMuls are left alone)",
    RULES,
)
