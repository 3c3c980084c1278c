"""fuse-activation: Conv/Gemm followed by an activation -> ONNX Runtime's fused kernels.

    act(Conv(x, w[, b]))            ->  FusedConv(x, w[, b], activation=act)          com.microsoft
    Relu(Add(Conv(x, w[, b]), z))   ->  FusedConv(x, w, b, z, activation="Relu")      (z: same shape; option)
    act(Gemm(a, b[, c]))            ->  FusedGemm(a, b[, c], activation=act)          com.microsoft

act is Relu, Sigmoid, Tanh, LeakyRelu, HardSigmoid or Clip with constant bounds (FusedGemm: the
first four). Only for the onnx target, whose runtime has these kernels; other targets are left
alone. ONNX Runtime makes the Conv/Gemm + activation fusions itself from its "extended"
optimization level (its default is higher), so they bring nothing there and are off unless
``ort-fused=true`` (for models run with ORT's optimizations lowered). Conv + Add + Relu is not
fused by ORT's CPU provider at that level, so it is on by default.
"""

from __future__ import annotations

import numpy as np
from infoptc.op_policy import policy
from infoptc.pass_manager import Option, PassContext, register_pass
from infoptc.pattern import RewritePass, Rule

CONV_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")
GEMM_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu")
DTYPES = {"float32"}  # ORT's CPU FusedConv / FusedGemm


def _after(producer, act):
    def pattern(op, x):
        core = getattr(op, producer)(x, _allow_other_inputs=True, _bind="core")
        return getattr(op, act)(core, _allow_other_inputs=act == "Clip", _bind="act")

    pattern.__name__ = f"{producer.lower()}_{act.lower()}"
    return pattern


def conv_add_relu(op, x, z):
    return op.Relu(op.Add(op.Conv(x, _allow_other_inputs=True, _bind="core"), z), _bind="act")


def _activation_params(ctx, act) -> list[float] | None:
    """The ``activation_params`` of FusedConv for ``act`` (None: bounds are not constants)."""
    if act.op == "LeakyRelu":
        return [float(ctx.attr(act, "alpha", 0.01))]
    if act.op == "HardSigmoid":
        return [float(ctx.attr(act, "alpha", 0.2)), float(ctx.attr(act, "beta", 0.5))]
    if act.op == "Clip":
        info = np.finfo(np.float32)
        if ctx.opset < 11:
            return [float(act.attrs.get("min", info.min)), float(act.attrs.get("max", info.max))]
        bounds = []
        for i, default in ((1, info.min), (2, info.max)):
            t = act.inputs[i] if len(act.inputs) > i and act.inputs[i].name else None
            value = default if t is None else ctx.value(t)
            if value is None or np.size(value) != 1:
                return None
            bounds.append(float(np.asarray(value).reshape(-1)[0]))
        return bounds
    return []


def check(ctx, x, core, act, z=None):
    if policy(ctx.pass_ctx) != "ort":
        return "the op policy is 'standard': no com.microsoft ops"
    if ctx.target != "onnx" and not ctx.options.get("any-target"):
        return f"target {ctx.target!r} has no fused Conv/Gemm kernels"
    if ctx.dtype(x) is None or ctx.dtype(x).name not in DTYPES:
        return f"dtype {ctx.dtype(x)} has no fused kernel"
    params = _activation_params(ctx, act)
    if params is None:
        return "Clip bounds are not constants"
    found = {"params": params}
    if z is not None:
        if not ctx.options.get("with-sum", True):
            return "fusing the residual Add is switched off"
        zs, ys = ctx.shape(z), ctx.shape(core.outputs[0])
        if not zs or zs != ys or not all(isinstance(d, int) for d in zs) or ctx.dtype(z) != ctx.dtype(x):
            return "the residual does not have the Conv output's exact static shape"
    return found


def fused(op, x, core, act, params, z=None):
    attrs = dict(core.attrs)
    attrs["activation"] = act.op
    if core.op == "Conv":
        if params:
            attrs["activation_params"] = params
        inputs = list(core.inputs[1:])
        if z is not None:
            inputs = inputs + [None] * (2 - len(inputs)) + [z]
        return op.FusedConv(x, *inputs, _domain="com.microsoft", **attrs)
    if params:
        attrs["activation_alpha"] = params[0]
    return op.FusedGemm(x, *core.inputs[1:], _domain="com.microsoft", **attrs)


CONV_ADD_RELU = Rule("conv_add_relu", conv_add_relu, fused, check)
ORT_FUSES_ITSELF = [
    Rule("conv_activation", [_after("Conv", a) for a in CONV_ACTIVATIONS], fused, check),
    Rule("gemm_activation", [_after("Gemm", a) for a in GEMM_ACTIVATIONS], fused, check),
]
RULES = [CONV_ADD_RELU, *ORT_FUSES_ITSELF]


@register_pass
class FuseActivation(RewritePass):
    name = "fuse-activation"
    summary = "Conv + residual Add + Relu (and, on request, Conv/Gemm + activation) -> com.microsoft FusedConv/FusedGemm"
    rules = RULES
    options = {
        "with-sum": Option(True, "fuse a residual Add between Conv and Relu (FusedConv's Z input)"),
        "ort-fused": Option(False, "also fuse Conv/Gemm + activation, which ONNX Runtime does itself from its "
                                   "'extended' level: for models run with lower ORT optimization levels"),
        "any-target": Option(False, "emit the contrib ops for targets other than onnx too"),
    }

    def rules_for(self, ctx: PassContext) -> list[Rule]:
        return RULES if self.opts["ort-fused"] else [CONV_ADD_RELU]
