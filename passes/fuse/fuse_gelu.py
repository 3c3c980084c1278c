"""fuse-gelu: decomposed GELU -> one Gelu op.

    x * 0.5 * (1 + erf(x / sqrt(2)))                                 ->  Gelu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))          ->  Gelu(x, approximate="tanh")

in the association orders exporters emit ((x * e) * 0.5, (x * 0.5) * e, x * (e * 0.5); x / sqrt2 or
x * (1/sqrt2); x^3 as Pow or Mul). The standard Gelu needs opset 20; below that, for the onnx
target, ONNX Runtime's contrib com.microsoft Gelu / FastGelu are emitted (option ``form``).
"""

from __future__ import annotations

import math

from infoptc.op_policy import contrib_allowed, policy
from infoptc.pass_manager import Option
from infoptc.pattern import Rule, rewrite_pass

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
STANDARD_OPSET = 20
CONTRIB_DTYPES = {"float32"}  # ORT's CPU kernels of com.microsoft Gelu/FastGelu


def _times_half(op, x, e, order):
    """The three ways exporters spell 0.5 * x * e."""
    if order == "xe_half":
        return op.Mul(op.Mul(x, e), 0.5)
    if order == "xhalf_e":
        return op.Mul(op.Mul(x, 0.5), e)
    return op.Mul(x, op.Mul(e, 0.5))


def _erf_pattern(order, scaling):
    def pattern(op, x):
        arg = op.Div(x, SQRT2) if scaling == "div" else op.Mul(x, 1.0 / SQRT2)
        return _times_half(op, x, op.Add(op.Erf(arg), 1.0), order)

    pattern.__name__ = f"erf_gelu_{order}_{scaling}"
    return pattern


def _cube(op, x, form):
    if form == "pow":
        return op.Pow(x, 3.0)
    if form == "x_xx":
        return op.Mul(x, op.Mul(x, x))
    return op.Mul(op.Mul(x, x), x)


def _tanh_pattern(order, cube):
    def pattern(op, x):
        inner = op.Add(x, op.Mul(_cube(op, x, cube), 0.044715))
        return _times_half(op, x, op.Add(op.Tanh(op.Mul(inner, SQRT_2_OVER_PI)), 1.0), order)

    pattern.__name__ = f"tanh_gelu_{order}_{cube}"
    return pattern


ORDERS = ("xe_half", "xhalf_e", "x_ehalf")


def _form(ctx, x) -> str | None:
    """The op to emit, or None with the reason stored in ``_why``."""
    wanted = ctx.options.get("form", "auto")
    if wanted == "standard" or (wanted == "auto" and ctx.opset >= STANDARD_OPSET):
        return "standard" if ctx.opset >= STANDARD_OPSET else None
    ort = policy(ctx.pass_ctx) == "ort"  # form=contrib may name another target, never override --ops standard
    if (wanted == "contrib" and ort) or (wanted == "auto" and contrib_allowed(ctx.pass_ctx)):
        dtype = ctx.dtype(x)
        return "contrib" if dtype is not None and dtype.name in CONTRIB_DTYPES else None
    return None


def check(ctx, x):
    form = _form(ctx, x)
    if form is None:
        return (f"no Gelu op for opset {ctx.opset}, target {ctx.target!r}, ops {policy(ctx.pass_ctx)!r}, "
                f"dtype {ctx.dtype(x)} "
                f"(standard Gelu needs opset {STANDARD_OPSET}; contrib Gelu is float32 on ONNX Runtime)")
    return {"form": form}


def check_tanh(ctx, x):
    """``check``; ONNX Runtime's FastGelu also refuses a scalar (rank 0) input at run time."""
    found = check(ctx, x)
    if isinstance(found, dict) and found["form"] == "contrib" and not ctx.rank(x):
        return f"com.microsoft FastGelu needs an input of known rank 1 or more, not {ctx.shape(x)}"
    return found


def erf_gelu(op, x, form):
    return op.Gelu(x) if form == "standard" else op.Gelu(x, _domain="com.microsoft")


def tanh_gelu(op, x, form):
    return op.Gelu(x, approximate="tanh") if form == "standard" else op.FastGelu(x, _domain="com.microsoft")


RULES = [
    Rule("erf_gelu", [_erf_pattern(o, s) for o in ORDERS for s in ("div", "mul")], erf_gelu, check),
    Rule("tanh_gelu", [_tanh_pattern(o, c) for o in ORDERS for c in ("pow", "x_xx", "xx_x")], tanh_gelu,
         check_tanh),
]

FuseGelu = rewrite_pass(
    "fuse-gelu",
    "decomposed erf/tanh GELU -> Gelu (opset 20) or ONNX Runtime's com.microsoft Gelu/FastGelu",
    RULES,
    options={"form": Option("auto", "auto: standard Gelu at opset >= 20, else contrib ops where the op policy "
                                    "allows them (--ops ort, onnx target); "
                                    "standard; contrib", choices=("auto", "standard", "contrib"))},
)
