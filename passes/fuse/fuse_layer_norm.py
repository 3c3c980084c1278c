"""fuse-layer-norm: decomposed LayerNorm over the last axis -> LayerNormalization (opset 17).

    d = x - ReduceMean(x)                               (axis -1, keepdims)
    y = d / Sqrt(ReduceMean(d ^ 2) + eps) * gamma + beta    ->  LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)

Also d * Reciprocal(Sqrt(...)), d * d for the square, Pow(., 0.5) for the root, the variance
as E[x^2] - E[x]^2 (ReduceMean(x^2) - mean^2: the fused op computes it the numerically safer
way), and the forms without beta or without gamma/beta. Both ReduceMeans must reduce exactly the last axis (the ``axes`` attribute before
opset 18, the constant ``axes`` input after); gamma and beta must be constants that vary only
along that axis.
"""

from __future__ import annotations

import numpy as np
from infoptc.pattern import Const, Rule, rewrite_pass

LAYER_NORM_OPSET = 17
DTYPES = {"float16", "float32", "float64"}


def _scalar(v: np.ndarray) -> bool:
    return v.size == 1 and v.dtype.kind == "f"


def _square(op, t, square):
    return op.Pow(t, 2.0) if square == "pow" else op.Mul(t, t)


def _normalized(op, x, eps, square, divide, variance="centered", root="sqrt"):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps), the common core of every form; the
    variance may also be written E[x^2] - E[x]^2 ("moments") and the root as Pow(., 0.5)."""
    mean = op.ReduceMean(x, _allow_other_inputs=True, _bind="mean")
    d = op.Sub(x, mean)
    if variance == "centered":
        var = op.ReduceMean(_square(op, d, square), _allow_other_inputs=True, _bind="var")
    else:
        var = op.Sub(op.ReduceMean(_square(op, x, square), _allow_other_inputs=True, _bind="var"),
                     _square(op, mean, square))
    shifted = op.Add(var, eps)
    std = op.Sqrt(shifted) if root == "sqrt" else op.Pow(shifted, 0.5)
    return op.Div(d, std) if divide == "div" else op.Mul(d, op.Reciprocal(std))


def _pattern(affine, square, divide, variance="centered", root="sqrt"):
    if affine == "scale_bias":
        def pattern(op, x, gamma=Const(), beta=Const(), eps=Const(_scalar)):
            return op.Add(op.Mul(_normalized(op, x, eps, square, divide, variance, root), gamma), beta)
    elif affine == "scale":
        def pattern(op, x, gamma=Const(), eps=Const(_scalar)):
            return op.Mul(_normalized(op, x, eps, square, divide, variance, root), gamma)
    else:
        def pattern(op, x, eps=Const(_scalar)):
            return _normalized(op, x, eps, square, divide, variance, root)
    pattern.__name__ = f"layer_norm_{affine}_{square}_{divide}_{variance}_{root}"
    return pattern


def reduce_axes(ctx, node) -> list[int] | None:
    """The axes a Reduce* node reduces: its attribute (opset < 18) or constant second input."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.value(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _along_last(value: np.ndarray, rank: int, width) -> np.ndarray | None:
    """``value`` as a [width] vector if it varies only along the last of ``rank`` axes."""
    if value.ndim > rank or any(d != 1 for d in value.shape[:-1]):
        return None
    last = value.shape[-1] if value.ndim else 1
    if last == 1 and isinstance(width, int):
        return np.broadcast_to(value.reshape(-1), (width,))
    return value.reshape(-1) if last == width else None


def check(ctx, x, mean, var, eps, gamma=None, beta=None):
    if ctx.opset < LAYER_NORM_OPSET:
        return f"LayerNormalization needs opset {LAYER_NORM_OPSET}, the model has {ctx.opset}"
    shape, dtype = ctx.shape(x), ctx.dtype(x)
    if shape is None or not shape:
        return "input rank unknown"
    if dtype is None or dtype.name not in DTYPES:
        return f"dtype {dtype} not supported by LayerNormalization"
    rank, width = len(shape), shape[-1]
    for node in (mean, var):
        axes = reduce_axes(ctx, node)
        if axes is None or [a % rank for a in axes] != [rank - 1]:
            return f"{node.name!r} reduces axes {axes}, not only the last one"
        if not ctx.attr(node, "keepdims", 1):
            return f"{node.name!r} does not keep dims"
    if not isinstance(width, int) and gamma is not None and ctx.value(gamma).ndim:
        width = ctx.value(gamma).shape[-1]  # a symbolic hidden size: gamma says what it is
    if not isinstance(width, int):
        return "last dimension unknown"
    found = {"epsilon": float(ctx.value(eps).reshape(-1)[0])}
    for key, t, default in (("scale", gamma, 1.0), ("bias", beta, None)):
        if t is None:
            found[key] = None if default is None else np.full((width,), default, dtype)
            continue
        value = _along_last(ctx.value(t), rank, width)
        if value is None or value.dtype != dtype:
            return f"{key} {t.name!r} of shape {list(ctx.value(t).shape)} does not vary along the last axis only"
        found[key] = t if ctx.value(t).shape == value.shape else np.ascontiguousarray(value)
    return found


def layer_norm(op, x, scale, bias, epsilon):
    return op.LayerNormalization(x, scale, bias, axis=-1, epsilon=epsilon)


AFFINE = ("scale_bias", "scale", "none")
RULES = [
    Rule("layer_norm", [_pattern(a, s, d, v, r) for a in AFFINE for s in ("pow", "mul") for d in ("div", "reciprocal")
                        for v in ("centered", "moments") for r in ("sqrt", "pow_half")],
         layer_norm, check),
]

FuseLayerNorm = rewrite_pass(
    "fuse-layer-norm",
    "decomposed LayerNorm (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, last axis) -> LayerNormalization",
    RULES,
)
