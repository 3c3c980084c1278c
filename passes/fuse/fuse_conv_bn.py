"""fuse-conv-bn: fold inference BatchNormalization, and per-channel Mul/Add, into Conv.

    BatchNormalization(Conv(x, w[, b]), scale, bias, mean, var)  ->  Conv(x, w * k, (b - mean) * k + bias)
    Mul(Conv(x, w[, b]), s)   ->  Conv(x, w * s, b * s)           (s constant, one value per channel)
    Add(Conv(x, w[, b]), c)   ->  Conv(x, w, b + c)

with k = scale / sqrt(var + epsilon). Folding is done in float64 and stored in the weight's
dtype. Every parameter must be a constant; the Conv output must feed nothing else.
"""

from __future__ import annotations

import numpy as np
from infoptc.pattern import Const, Rule, rewrite_pass


def _float(v: np.ndarray) -> bool:
    return v.dtype.kind == "f"


# ----------------------------------------------------------------------------- patterns


def conv_bn(op, x, w=Const(_float), scale=Const(), bias=Const(), mean=Const(), var=Const()):
    return op.BatchNormalization(op.Conv(x, w, _bind="conv"), scale, bias, mean, var, _bind="bn")


def conv_bias_bn(op, x, w=Const(_float), b=Const(), scale=Const(), bias=Const(), mean=Const(), var=Const()):
    return op.BatchNormalization(op.Conv(x, w, b, _bind="conv"), scale, bias, mean, var, _bind="bn")


def conv_mul(op, x, w=Const(_float), s=Const(_float)):
    return op.Mul(op.Conv(x, w, _bind="conv"), s)


def conv_bias_mul(op, x, w=Const(_float), b=Const(), s=Const(_float)):
    return op.Mul(op.Conv(x, w, b, _bind="conv"), s)


def conv_add(op, x, w=Const(_float), c=Const(_float)):
    return op.Add(op.Conv(x, w, _bind="conv"), c)


def conv_bias_add(op, x, w=Const(_float), b=Const(), c=Const(_float)):
    return op.Add(op.Conv(x, w, b, _bind="conv"), c)


# ----------------------------------------------------------------------------- conditions


def _bias(ctx, w, b) -> np.ndarray:
    channels = ctx.value(w).shape[0]
    return np.zeros(channels) if b is None else ctx.value(b).astype(np.float64)


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as a [channels] vector if it broadcasts over an NC... tensor per channel only."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def check_bn(ctx, w, bn, scale, bias, mean, var, b=None):
    if ctx.attr(bn, "training_mode", 0):
        return "BatchNormalization runs in training mode"
    weight = ctx.value(w)
    channels = weight.shape[0]
    params = [ctx.value(t) for t in (scale, bias, mean, var)]
    if any(p.shape != (channels,) for p in params):
        return f"BatchNormalization parameters are not [{channels}] vectors"
    scale_v, bias_v, mean_v, var_v = (p.astype(np.float64) for p in params)
    k = scale_v / np.sqrt(var_v + float(ctx.attr(bn, "epsilon", 1e-5)))
    folded_w = weight.astype(np.float64) * k.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_b = (_bias(ctx, w, b) - mean_v) * k + bias_v
    return {"w2": folded_w.astype(weight.dtype), "b2": folded_b.astype(weight.dtype)}


def check_mul(ctx, w, s, b=None):
    weight = ctx.value(w)
    k = _per_channel(ctx.value(s), weight.ndim, weight.shape[0])
    if k is None:
        return "the multiplier is not one constant per output channel"
    folded_w = weight.astype(np.float64) * k.reshape((-1,) + (1,) * (weight.ndim - 1))
    return {"w2": folded_w.astype(weight.dtype), "b2": (_bias(ctx, w, b) * k).astype(weight.dtype)}


def check_add(ctx, w, c, b=None):
    weight = ctx.value(w)
    shift = _per_channel(ctx.value(c), weight.ndim, weight.shape[0])
    if shift is None:
        return "the addend is not one constant per output channel"
    return {"w2": w, "b2": (_bias(ctx, w, b) + shift).astype(weight.dtype)}


def folded_conv(op, x, conv, w2, b2):
    return op.Conv(x, w2, b2, **conv.attrs)


RULES = [
    Rule("conv_bn", [conv_bn, conv_bias_bn], folded_conv, check_bn),
    Rule("conv_mul", [conv_mul, conv_bias_mul], folded_conv, check_mul),
    Rule("conv_add", [conv_add, conv_bias_add], folded_conv, check_add),
]

FuseConvBn = rewrite_pass(
    "fuse-conv-bn",
    "fold inference BatchNormalization and per-channel constant Mul/Add into the preceding Conv",
    RULES,
)
