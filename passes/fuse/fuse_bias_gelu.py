"""fuse-bias-gelu: Gelu(x + bias) -> ONNX Runtime's BiasGelu / FastGelu with a bias input.

    Gelu(x + bias)                     ->  BiasGelu(x, bias)      com.microsoft   (ai.onnx or contrib Gelu)
    Gelu(x + bias, approximate=tanh)   ->  FastGelu(x, bias)      com.microsoft   (also contrib FastGelu)

As ONNX Runtime's transformer optimizer does after the feed-forward MatMul: the bias Add
disappears into the activation kernel. Runs after fuse-gelu (which makes the Gelu from the
decomposed erf/tanh forms). Only where the op policy allows contrib ops (``--ops ort``, onnx
target); the bias must be a constant vector as long as the input's last axis, float32.
"""

from __future__ import annotations

from infoptc.op_policy import contrib_allowed, policy
from infoptc.pattern import Const, Rule, rewrite_pass

CONTRIB_DTYPES = {"float32"}  # ORT's CPU BiasGelu / FastGelu


def _bias_pattern(kind):
    def pattern(op, x, bias=Const()):
        biased = op.Add(x, bias, _bind="bias_add")
        if kind == "standard":
            return op.Gelu(biased, approximate="none")
        if kind == "standard_tanh":
            return op.Gelu(biased, approximate="tanh")
        if kind == "contrib":
            return op.Gelu(biased, _domain="com.microsoft")
        return op.FastGelu(biased, _domain="com.microsoft")

    pattern.__name__ = f"bias_gelu_{kind}"
    return pattern


def check_bias(ctx, x, bias):
    """ONNX Runtime's BiasGelu / FastGelu take a 1-D bias as long as the input's last axis."""
    if not contrib_allowed(ctx.pass_ctx):
        return f"contrib ops are not allowed (ops {policy(ctx.pass_ctx)!r}, target {ctx.target!r})"
    shape, dtype = ctx.shape(x), ctx.dtype(x)
    if not shape or len(shape) < 2 or dtype is None or dtype.name not in CONTRIB_DTYPES:
        return f"input {x.name!r} is not a float32 tensor of rank >= 2"
    b = ctx.shape(bias)
    if b is None or len(b) != 1 or not isinstance(shape[-1], int) or b[0] != shape[-1] or ctx.dtype(bias) != dtype:
        return f"bias {bias.name!r} of shape {b} is not a vector as long as the last axis ({shape[-1]})"
    return True


def bias_gelu(op, x, bias):
    return op.BiasGelu(x, bias, _domain="com.microsoft")


def bias_fast_gelu(op, x, bias):
    return op.FastGelu(x, bias, _domain="com.microsoft")


RULES = [
    Rule("bias_gelu", [_bias_pattern(k) for k in ("standard", "contrib")], bias_gelu, check_bias),
    Rule("bias_fast_gelu", [_bias_pattern(k) for k in ("standard_tanh", "fast")], bias_fast_gelu, check_bias),
]

FuseBiasGelu = rewrite_pass(
    "fuse-bias-gelu",
    "Gelu(x + bias) -> com.microsoft BiasGelu / FastGelu with its bias input (--ops ort)",
    RULES,
)
