"""correct-bias: move the mean error that int8 weights will make into the bias, before quantizing.

Rounding a layer's weights to int8 shifts the mean of its outputs: for an input ``x``,
``E[W_q x] - E[W x] = (W_q - W) E[x]``, and errors of the same sign across many inputs add up
instead of averaging out (Nagel et al., "Data-Free Quantization", 2019, section 4.2; here the
empirical form, with ``E[x]`` per input channel measured on the calibration data). This pass runs
just before ``quantize-int8`` and adds ``(W - W_q) E[x]`` to each Conv's and Gemm's bias, with
``W_q`` computed exactly as the quantizer will (symmetric per channel, the host's weight range),
so that the quantized layer's mean output matches the fp32 layer's. On its own it changes the
fp32 model (LOSSY): it is only meaningful followed by ``quantize-int8`` with the same ``isa``.
Zero padding at a Conv's borders is not modelled (the mean is taken as if every tap saw E[x]).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.ir import from_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from . import calibration
from .equalize_cross_layer import set_constant
from .common import CALIBRATION_OPTIONS, const_float, excluded, is_float_activation, parse_exclude
from .plan import weight_axis
from .qdq import quantize_weight
from .recipe import ISAS, recipe_for


def _dequantized(w: np.ndarray, axis: int, qmax: int, per_channel: bool = True) -> np.ndarray:
    q, scale = quantize_weight(w, axis, qmax, per_channel)
    shape = [1] * w.ndim
    shape[axis] = -1
    return q.astype(np.float64) * scale.reshape(shape).astype(np.float64)


def bias_shift(node: gs.Node, w: np.ndarray, axis: int, qmax: int, mean_x: np.ndarray,
               per_channel: bool = True) -> np.ndarray:
    """``(W - W_q) E[x]`` per output channel of a Conv (w [O, I/g, kh, kw]) or Gemm (w [K, N] or
    [N, K] with transB)."""
    err = w.astype(np.float64) - _dequantized(w, axis, qmax, per_channel)
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        out_ch, in_per_group = err.shape[:2]
        per_tap = err.sum(axis=tuple(range(2, err.ndim)))  # [O, I/g]: every tap sees E[x]
        per_group_out = out_ch // group
        means = mean_x.reshape(group, in_per_group)  # input channels of each group
        return np.concatenate([per_tap[g * per_group_out:(g + 1) * per_group_out] @ means[g] for g in range(group)])
    return err @ mean_x if node.attrs.get("transB", 0) else mean_x @ err


@register_pass
class CorrectBias(Pass):
    name = "correct-bias"
    summary = "add the mean output shift of int8 weights, (W - W_q) E[x], to each Conv/Gemm bias (before quantize-int8)"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        **CALIBRATION_OPTIONS,
        "isa": Option("auto", "the CPU the int8 kernels target; must match quantize-int8's", choices=ISAS),
        "exclude": Option("", "node names or op types left alone, separated by ';'"),
        "per-channel": Option(True, "the weight scales quantize-int8 will use: per channel, or one per tensor"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        qmax = recipe_for(self.opts["isa"]).weight_qmax
        exclude = parse_exclude(self.opts["exclude"])
        targets = []
        for node in graph.nodes:
            found = weight_axis(node) if node.op in ("Conv", "Gemm") else None
            if found is None or excluded(node, exclude) or not is_float_activation(node.inputs[0]):
                continue
            targets.append((node, *found))
        if not targets:
            return PassResult(False, {"corrected": 0})
        source = calibration.calibration_source(ctx.options, self.opts, self.name)
        model = from_graph(graph)
        data = calibration.CalibrationData(source, calibration.model_inputs(model), self.opts["samples"])
        axes = {node.inputs[0].name: (1 if node.op == "Conv" else -1) for node, _, _ in targets}
        stats = calibration.channel_stats(model, axes, data)
        namer = Namer([graph])
        for node, index, axis in targets:
            w = const_float(node.inputs[index])
            shift = bias_shift(node, w, axis, qmax, stats[node.inputs[0].name][0], self.opts["per-channel"])
            has_bias = len(node.inputs) > 2 and node.inputs[2].name
            bias = const_float(node.inputs[2]).astype(np.float64) if has_bias else np.zeros(shift.shape)
            set_constant(node, 2, bias + shift, namer, "_corrected")
        return PassResult(True, {"corrected": len(targets)})
