"""fuse-gemm-reshape: a Gemm between a flattening and an unflattening Reshape -> a batched MatMul.

    Reshape(Gemm(Reshape(x, [-1, K]), W, b), [d0, .., dn-2, N])  ->  MatMul(x, W) + b      x: [d0, .., dn-2, K]

torch exports ``addmm`` on a 2-D view: GPT-2's Conv1D (``x.view(-1, nx)`` then ``addmm`` then
``view(size_out)``) and the dynamo exporter's ``nn.Linear`` on 3-D inputs both write it. The
views hide the projection from the transformer fusions (attention sees a Reshape, not the
projection; the bias cannot join SkipLayerNormalization or FastGelu), and cost two nodes. The
output view must provably restore x's leading dims (each entry is that dim of x, followed to its
origin, or the same known size); Gemm must have ``transA=0``, ``alpha=beta=1`` and a constant W
(``transB=1`` transposes it). The same dot products and bias add; the contract stays
reassociating, as a batched MatMul may block the sums differently from Gemm.
"""

from __future__ import annotations

import numpy as np
from infoptc.pattern import Const, Rule, rewrite_pass

from ._dims import dims, same_dim


def gemm_views(op, x, flat_shape, out_shape, w=Const(), b=Const()):
    flat = op.Reshape(x, flat_shape, _bind="flatten")
    return op.Reshape(op.Gemm(flat, w, b, _bind="gemm"), out_shape, _bind="unflatten")


def check(ctx, x, w, b, gemm, flatten, unflatten):
    xs = ctx.shape(x)
    if not xs or len(xs) < 3 or not isinstance(xs[-1], int):
        return f"{x.name!r} is not a tensor of rank >= 3 with a known last dim"
    k = xs[-1]
    if [ctx.attr(gemm, "transA", 0), ctx.attr(gemm, "alpha", 1.0), ctx.attr(gemm, "beta", 1.0)] != [0, 1.0, 1.0]:
        return "Gemm transposes A or scales"
    weight = ctx.value(w)
    if ctx.attr(gemm, "transB", 0):
        weight = np.ascontiguousarray(weight.T)
    n = weight.shape[1]
    if weight.ndim != 2 or weight.shape[0] != k:
        return f"weight of shape {list(weight.shape)} does not take {k} inputs"
    bias = ctx.value(b)
    if bias.size not in (1, n) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        return f"bias of shape {list(bias.shape)} is not a row of {n}"
    flat = ctx.value(flatten.inputs[1])
    if flat is None or flat.reshape(-1).tolist() not in ([-1, k],):
        return f"{flatten.name!r} does not view the input as [-1, {k}]"
    entries = dims(ctx, unflatten.inputs[1])
    if entries is None or len(entries) != len(xs) or entries[-1] not in (n, -1):
        return f"{unflatten.name!r} does not restore [..., {n}]"
    for i, e in enumerate(entries[:-1]):
        if isinstance(e, tuple):
            if not same_dim(ctx, e, x, i):
                return f"{unflatten.name!r} sets dim {i} from a tensor not known to match {x.name!r}"
        elif not (isinstance(xs[i], int) and xs[i] == e) and not (e == 0 and not ctx.attr(unflatten, "allowzero", 0)):
            return f"{unflatten.name!r} sets dim {i} to {e}, {x.name!r} has {xs[i]}"
    found = {"n": n, "bias": b if bias.shape == (n,) else np.ascontiguousarray(np.broadcast_to(bias.reshape(-1), (n,)))}
    found["weight"] = w if not ctx.attr(gemm, "transB", 0) else weight
    return found


def matmul_bias(op, x, weight, bias, n):
    shape = list(op.ctx.shape(x))[:-1] + [n]  # the passes after this one read the product's dtype and shape
    return op.Add(op.MatMul(x, weight, _dtype=x.dtype, _shape=shape), bias)


RULES = [Rule("gemm_views", gemm_views, matmul_bias, check)]

FuseGemmReshape = rewrite_pass(
    "fuse-gemm-reshape",
    "Reshape(Gemm(Reshape(x, [-1, K]), W, b), [..., N]) (torch's addmm on a 2-D view) -> MatMul(x, W) + b",
    RULES,
)
