"""smooth-quant: move activation outliers of transformer MatMuls into their weights.

    MatMul(LayerNorm(x; g, b), W)  ->  MatMul(LayerNorm(x; g / s, b / s), diag(s) W)

Transformer activations have a few channels far larger than the rest; one int8 scale for the
whole tensor then leaves the others a handful of levels. Weights are easy to quantize per channel,
so SmoothQuant (Xiao et al., 2023) divides each activation channel j by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies row j of the weight by it; the
division is folded into the LayerNormalization's scale and bias, so nothing is added to the graph.
``max|X_j|`` is measured on the calibration data. The MatMuls with a constant [K, N] weight that
read one LayerNorm share one s (Q, K and V); when something else reads the LayerNorm too (the
residual of a post-LN transformer), a Mul by 1/s on the MatMuls' side does the division instead.
Exact in real arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.ir import from_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from . import calibration
from .equalize_cross_layer import set_constant
from .common import CALIBRATION_OPTIONS, const_float


def smoothable(graph: gs.Graph) -> list[tuple[gs.Node, list[gs.Node]]]:
    """(LayerNormalization, the MatMuls reading it) where the LN's affine parameters are constant
    per-channel vectors and at least one reader is a MatMul with a constant 2-D weight. When
    other ops read the LN too (a post-LN transformer's residual), the division is a Mul on the
    MatMuls' side instead of a change of the LN."""
    found = []
    for ln in graph.nodes:
        if ln.op != "LayerNormalization" or int(ln.attrs.get("axis", -1)) not in (-1, len(ln.inputs[0].shape or [0]) - 1):
            continue
        out = ln.outputs[0]
        scale = const_float(ln.inputs[1]) if len(ln.inputs) > 1 else None
        bias = const_float(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2].name else None
        if scale is None or scale.ndim != 1 or (len(ln.inputs) > 2 and ln.inputs[2].name and bias is None):
            continue
        matmuls = [r for r in out.outputs if r.op == "MatMul" and r.inputs[0] is out
                   and const_float(r.inputs[1]) is not None and const_float(r.inputs[1]).ndim == 2
                   and const_float(r.inputs[1]).shape[0] == scale.shape[0]]
        if matmuls:
            found.append((ln, matmuls))
    return found


@register_pass
class SmoothQuant(Pass):
    name = "smooth-quant"
    summary = "fold per-channel activation scales of LayerNorm -> MatMul into the weights (SmoothQuant) before int8"
    contract = Contract.REASSOCIATING
    reports_changes = True
    options = {
        "alpha": Option(0.5, "migration strength: 0 leaves activations alone, 1 moves all of their range"),
        **CALIBRATION_OPTIONS,
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        sites = smoothable(graph)
        if not sites:
            return PassResult(False, {"smoothed": 0})
        source = calibration.calibration_source(ctx.options, self.opts, self.name)
        model = from_graph(graph)
        data = calibration.CalibrationData(source, calibration.model_inputs(model), self.opts["samples"])
        stats = calibration.channel_stats(model, {ln.outputs[0].name: -1 for ln, _ in sites}, data)
        alpha = float(self.opts["alpha"])
        namer = Namer([graph])
        outputs = {t.name for t in graph.outputs}
        for ln, readers in sites:
            act = stats[ln.outputs[0].name][1]
            wmax = np.max([np.abs(const_float(r.inputs[1])).max(axis=1) for r in readers], axis=0)
            s = np.where((act > 0) & (wmax > 0), act**alpha / np.where(wmax > 0, wmax, 1) ** (1 - alpha), 1.0)
            s = np.clip(s, 1e-5, 1e5)
            out = ln.outputs[0]
            if out.name not in outputs and all(r in readers for r in out.outputs):
                set_constant(ln, 1, const_float(ln.inputs[1]).astype(np.float64) / s, namer, "_smoothed")
                if len(ln.inputs) > 2 and ln.inputs[2].name:
                    set_constant(ln, 2, const_float(ln.inputs[2]).astype(np.float64) / s, namer, "_smoothed")
            else:  # others read the LN as it is: divide on the MatMuls' side only
                smoothed = gs.Variable(namer(f"{out.name}_smoothed"), dtype=np.float32)
                inverse = gs.Constant(namer(f"{ln.name}_smooth_inverse"), (1.0 / s).astype(np.float32))
                graph.nodes.append(gs.Node("Mul", namer(f"{ln.name}_smooth"), {}, [out, inverse], [smoothed]))
                for r in readers:
                    r.inputs[0] = smoothed
            for r in readers:
                set_constant(r, 1, const_float(r.inputs[1]).astype(np.float64) * s.reshape(-1, 1), namer, "_smoothed")
        return PassResult(True, {"smoothed": len(sites)})
