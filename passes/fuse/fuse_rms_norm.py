"""fuse-rms-norm: decomposed RMSNorm over the last axis -> one normalization op.

    y = x / Sqrt(ReduceMean(x ^ 2) + eps) * w        (also x * Reciprocal(...), x * (1 / ...), x * x)
        ->  RMSNormalization(x, w, axis=-1, epsilon=eps)                              opset >= 23
    y = (a + b) / Sqrt(ReduceMean((a + b) ^ 2) + eps) * w
        ->  y, a + b = SkipSimplifiedLayerNormalization(a, b, w, epsilon=eps)         com.microsoft

ONNX Runtime registers its SimplifiedLayerNormalization only in the ONNX domain (which the
ONNX checker rejects), so below opset 23 the contrib form is the Skip variant, emitted where
the normalized value is a residual sum (the usual pre-norm block); the sum stays available to
its other readers. That form only with ``device=gpu``: ONNX Runtime makes Add +
SimplifiedLayerNormalization of the decomposed form at load, faster on its CPU provider than
SkipSimplifiedLayerNormalization, so ``device=cpu`` (the default) leaves it decomposed and
says so in ``--stats``; and a spelling ONNX Runtime does not fuse at load (the dynamo
exporter's ``x * Reciprocal(Sqrt(...))``) is respelled as ``Div(x, Sqrt(...))``, which it does
(rule ``ort_form``). The weight must be a constant varying only along the last axis.
"""

from __future__ import annotations

import numpy as np
from infoptc.op_policy import contrib_allowed, policy
from infoptc.pass_manager import Option
from infoptc.pattern import Const, Rule, rewrite_pass

from .fuse_layer_norm import reduce_axes
from .fuse_skip_layer_norm import DEVICE_OPTION, cpu_reason

STANDARD_OPSET = 23
STANDARD_DTYPES = {"float16", "float32", "float64"}
CONTRIB_DTYPES = {"float32"}


def _scalar(v: np.ndarray) -> bool:
    return v.size == 1 and v.dtype.kind == "f"


def _rms(op, x, eps, square, divide):
    sq = op.Pow(x, 2.0) if square == "pow" else op.Mul(x, x)
    root = op.Sqrt(op.Add(op.ReduceMean(sq, _allow_other_inputs=True, _bind="mean"), eps))
    if divide == "div":
        return op.Div(x, root)
    return op.Mul(x, op.Reciprocal(root) if divide == "reciprocal" else op.Div(1.0, root))


def _pattern(weighted, square, divide):
    if weighted:
        def pattern(op, x, w=Const(), eps=Const(_scalar)):
            return op.Mul(_rms(op, x, eps, square, divide), w)
    else:
        def pattern(op, x, eps=Const(_scalar)):
            return _rms(op, x, eps, square, divide)
    pattern.__name__ = f"rms_norm_{'w' if weighted else 'plain'}_{square}_{divide}"
    return pattern


def _skip_pattern(weighted, square, divide):
    if weighted:
        def pattern(op, a, b, w=Const(), eps=Const(_scalar)):
            total = op.Add(a, b, _bind="residual")
            return op.Mul(_rms(op, total, eps, square, divide), w), total
    else:
        def pattern(op, a, b, eps=Const(_scalar)):
            total = op.Add(a, b, _bind="residual")
            return _rms(op, total, eps, square, divide), total
    pattern.__name__ = f"skip_rms_norm_{'w' if weighted else 'plain'}_{square}_{divide}"
    return pattern


VARIANTS = [(w, s, d) for w in (True, False) for s in ("pow", "mul") for d in ("div", "reciprocal", "one_over")]


def _common(ctx, x, mean, eps, w, dtypes) -> dict | str:
    shape, dtype = ctx.shape(x), ctx.dtype(x)
    if not shape or dtype is None or dtype.name not in dtypes:
        return f"input rank or dtype ({dtype}) not supported"
    rank, width = len(shape), shape[-1]
    axes = reduce_axes(ctx, mean)
    if axes is None or [a % rank for a in axes] != [rank - 1] or not ctx.attr(mean, "keepdims", 1):
        return f"{mean.name!r} does not reduce exactly the last axis with keepdims"
    if w is None:
        if not isinstance(width, int):
            return "last dimension unknown"
        scale = np.ones((width,), dtype)
    else:
        value = ctx.value(w)
        if value.dtype != dtype or value.ndim > rank or any(d != 1 for d in value.shape[:-1]):
            return f"weight {w.name!r} of shape {list(value.shape)} does not vary along the last axis only"
        last = value.shape[-1] if value.ndim else 1
        if last != width:
            if last != 1 or not isinstance(width, int):
                return f"weight {w.name!r} does not match the last dimension {width}"
            value = np.broadcast_to(value.reshape(-1), (width,))
        scale = w if ctx.value(w).shape == (width,) else np.ascontiguousarray(value.reshape(-1))
    return {"scale": scale, "epsilon": float(ctx.value(eps).reshape(-1)[0])}


def check(ctx, x, mean, eps, w=None):
    if ctx.opset < STANDARD_OPSET:
        return f"RMSNormalization needs opset {STANDARD_OPSET}, the model has {ctx.opset}"
    return _common(ctx, x, mean, eps, w, STANDARD_DTYPES)


def check_skip(ctx, a, b, residual, mean, eps, w=None):
    if ctx.opset >= STANDARD_OPSET:
        return "the standard RMSNormalization is available"
    if ctx.options.get("contrib", True) is False or not contrib_allowed(ctx.pass_ctx):
        return f"contrib ops are not allowed (ops {policy(ctx.pass_ctx)!r}, target {ctx.target!r})"
    out = residual.outputs[0]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(out)
    if not (sa and sb and so and len(sa) == len(so) == 3 and sa == so and len(sb) in (2, 3) and sb[-2:] == so[-2:]):
        return "SkipSimplifiedLayerNormalization wants a [B, S, H] input and a [B, S, H] or [S, H] skip"
    if len(sb) == 3 and sb[0] != sa[0]:
        return "skip batch differs from the input's"
    found = _common(ctx, out, mean, eps, w, CONTRIB_DTYPES)
    return (cpu_reason(ctx, "SkipSimplifiedLayerNormalization") or found) if isinstance(found, dict) else found


def rms_norm(op, x, scale, epsilon):
    return op.RMSNormalization(x, scale, axis=-1, epsilon=epsilon)


def skip_rms_norm(op, a, b, scale, epsilon):
    y, _, _, total = op.SkipSimplifiedLayerNormalization(a, b, scale, _domain="com.microsoft", _outputs=4,
                                                         epsilon=epsilon)
    return y, total


def check_ort_form(ctx, x, mean, eps, w):
    """For ONNX Runtime's CPU provider below opset 23: a weighted RMSNorm spelled other than
    ``Pow(x, 2)`` ... ``Div(x, Sqrt(...))`` (the dynamo exporter writes ``x * Reciprocal(Sqrt(...))``),
    which ONNX Runtime does not fuse at load, is respelled in that form, which it does."""
    if ctx.opset >= STANDARD_OPSET:
        return "the standard RMSNormalization is available"
    if ctx.target != "onnx" or ctx.options.get("device", "cpu") != "cpu":
        return f"only for ONNX Runtime's CPU provider (target {ctx.target!r}, device {ctx.options.get('device')!r})"
    found = _common(ctx, x, mean, eps, w, CONTRIB_DTYPES)
    if not isinstance(found, dict):
        return found
    axes = [mean.inputs[1]] if len(mean.inputs) > 1 else []
    return {"two": np.array(2.0, ctx.dtype(x)), "axes": axes, "mean_attrs": dict(mean.attrs)}


def ort_form(op, x, eps, w, two, axes, mean_attrs):
    mean = op.ReduceMean(op.Pow(x, two), *axes, **mean_attrs)
    return op.Mul(op.Div(x, op.Sqrt(op.Add(mean, eps))), w)


RULES = [
    Rule("rms_norm", [_pattern(*v) for v in VARIANTS], rms_norm, check),
    Rule("skip_rms_norm", [_skip_pattern(*v) for v in VARIANTS], skip_rms_norm, check_skip),
    # after both: the forms ONNX Runtime does not recognise, respelled in the one it fuses
    Rule("ort_form", [_pattern(True, s, d) for s, d in (("pow", "reciprocal"), ("pow", "one_over"), ("mul", "div"),
                                                        ("mul", "reciprocal"), ("mul", "one_over"))],
         ort_form, check_ort_form),
]

FuseRmsNorm = rewrite_pass(
    "fuse-rms-norm",
    "decomposed RMSNorm -> RMSNormalization (opset 23) or com.microsoft SkipSimplifiedLayerNormalization",
    RULES,
    options={"contrib": Option(True, "below opset 23, emit ONNX Runtime's SkipSimplifiedLayerNormalization "
                                     "for the onnx target"),
             "device": DEVICE_OPTION},
)
