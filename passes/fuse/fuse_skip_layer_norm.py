"""fuse-skip-layer-norm: residual Add (+ bias) + LayerNormalization -> SkipLayerNormalization.

    y = LayerNormalization(a + b, gamma, beta)            ->  y, s = SkipLayerNormalization(a, b, gamma, beta)
    y = LayerNormalization((a + bias) + b, gamma, beta)   ->  y, s = SkipLayerNormalization(a, b, gamma, beta, bias)

ONNX Runtime's com.microsoft op, as its transformer optimizer writes it: the residual sum s
stays available to its other readers (pre-norm blocks add it to the next residual), and a
constant 1-D bias of the projection before the residual (``MatMul + bias``) is absorbed too.
Only where the op policy allows contrib ops (``--ops ort``, the onnx target); with ``--ops
standard`` the Add and the standard LayerNormalization stay, and ``--stats`` says so. Only with
``device=gpu``: by default (``device=cpu``) ``--stats`` reports each match as rejected, because
ONNX Runtime's CPU kernel for it is several times slower than the Add + LayerNormalization it
runs otherwise (see ``cpu_reason``). Runs after
fuse-layer-norm, which makes the LayerNormalization from the decomposed form.
Conditions: a [B, S, H] sum with a known H, both addends of that exact shape (no broadcast),
1-D gamma/beta/bias of H, normalization over the last axis in fp32 (stash_type 1), float32 or
float16, and the LayerNormalization's optional mean / inv-std outputs unread.
"""

from __future__ import annotations

from infoptc.op_policy import contrib_allowed, policy
from infoptc.pass_manager import Option
from infoptc.pattern import Const, Rule, rewrite_pass

from ._dims import same_shape

SKIP_DTYPES = {"float32", "float16"}  # ONNX Runtime's SkipLayerNormalization


def _skip_pattern(biased: bool, with_beta: bool):
    """LayerNormalization(a [+ bias] + b, gamma[, beta]); returns (normalized, residual sum)."""
    def build(op, a, b, gamma, beta=None, bias=None):
        x = op.Add(a, bias, _bind="bias_add") if biased else a
        total = op.Add(x, b, _bind="residual")
        affine = (gamma, beta) if with_beta else (gamma,)
        return op.LayerNormalization(total, *affine, _bind="norm"), total

    if biased and with_beta:
        def pattern(op, a, b, gamma, beta, bias=Const()):
            return build(op, a, b, gamma, beta, bias)
    elif biased:
        def pattern(op, a, b, gamma, bias=Const()):
            return build(op, a, b, gamma, bias=bias)
    elif with_beta:
        def pattern(op, a, b, gamma, beta):
            return build(op, a, b, gamma, beta)
    else:
        def pattern(op, a, b, gamma):
            return build(op, a, b, gamma)
    pattern.__name__ = f"skip_layer_norm{'_bias' if biased else ''}{'' if with_beta else '_no_beta'}"
    return pattern


def _vector(ctx, t, width) -> bool:
    shape = ctx.shape(t)
    return shape is not None and len(shape) == 1 and shape[0] == width


DEVICE_OPTION = Option("cpu", "where ONNX Runtime will run the model: cpu keeps Add + normalization (its CPU "
                              "Skip*Normalization kernels are slower than that pair), gpu fuses",
                       choices=("cpu", "gpu"))


def cpu_reason(ctx, op_type: str) -> str | None:
    """Why a Skip*Normalization fusion is refused for ``device=cpu`` (the default).

    ONNX Runtime's CPU kernel for these ops is a scalar loop per row; the Add and the
    LayerNormalization (or the SimplifiedLayerNormalization ONNX Runtime makes of a decomposed
    RMSNorm at load) it runs instead are vectorized: 22 us against 152 us for one [1, 128, 256]
    LayerNorm, 15 against 28 for an RMSNorm (docs/fusions-real-exports.md). Fusing made ViT-Ti
    1.16x and BERT 1.07x the original's latency on ONNX Runtime."""
    if ctx.options.get("device", "cpu") == "gpu":
        return None
    return (f"ONNX Runtime's CPU {op_type} kernel is slower than the Add + normalization it runs instead "
            "(device=gpu fuses it)")


def check_skip(ctx, a, b, gamma, norm, residual, beta=None, bias=None):
    """ONNX Runtime's SkipLayerNormalization: [B, S, H] input, a skip of the same shape, 1-D
    gamma/beta/bias of H, normalization over the last axis, float32 or float16."""
    if not contrib_allowed(ctx.pass_ctx):
        return f"contrib ops are not allowed (ops {policy(ctx.pass_ctx)!r}, target {ctx.target!r})"
    shape, dtype = ctx.shape(residual.outputs[0]), ctx.dtype(a)
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return f"the residual sum is not a [B, S, H] tensor with a known H ({shape})"
    if dtype is None or dtype.name not in SKIP_DTYPES or ctx.dtype(b) != dtype:
        return f"dtype {dtype} has no SkipLayerNormalization kernel"
    if [ctx.attr(norm, "axis", -1) % 3, ctx.attr(norm, "stash_type", 1)] != [2, 1] or len(norm.outputs) > 1 \
            and any(t.outputs for t in norm.outputs[1:]):
        return "LayerNormalization is not over the last axis in fp32, or its mean/inv-std outputs are read"
    sa, sb = ctx.shape(a), ctx.shape(b)
    if not (sa == sb == shape or same_shape(ctx, a, b)):
        return (f"addends {a.name!r} {sa} and {b.name!r} {sb} are not provably of one shape "
                "(SkipLayerNormalization does not broadcast)")
    for key, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is not None and not (_vector(ctx, t, shape[2]) and ctx.dtype(t) == dtype):
            return f"{key} {t.name!r} is not a [{shape[2]}] {dtype} vector"
    return cpu_reason(ctx, "SkipLayerNormalization") or {"epsilon": float(ctx.attr(norm, "epsilon", 1e-5))}


def skip_layer_norm(op, a, b, gamma, epsilon, beta=None, bias=None):
    y, _, _, total = op.SkipLayerNormalization(a, b, gamma, beta, bias, _domain="com.microsoft", _outputs=4,
                                               epsilon=epsilon)
    return y, total


RULES = [
    # the biased forms first: otherwise the plain one takes the residual and leaves the bias Add
    Rule("skip_layer_norm", [_skip_pattern(bi, be) for bi in (True, False) for be in (True, False)],
         skip_layer_norm, check_skip),
]

FuseSkipLayerNorm = rewrite_pass(
    "fuse-skip-layer-norm",
    "residual Add (+ bias) + LayerNormalization -> com.microsoft SkipLayerNormalization (--ops ort)",
    RULES,
    options={"device": DEVICE_OPTION},
)
