"""quantize-int8-dynamic: int8 weights, activations quantized at run time (no calibration).

    MatMul(x, w)            ->  DynamicQuantizeMatMul(x, w_s8, s_w)          com.microsoft
    Add(MatMul(x, w), b)    ->  DynamicQuantizeMatMul(x, w_s8, s_w, , b)     (b constant, one per column)
    Gemm(x, w, c)           ->  DynamicQuantizeMatMul(x, w_s8 (transposed if transB), s_w, , c)

Weights are int8, symmetric, one scale per output column; ONNX Runtime quantizes ``x`` to uint8
per call from its own range, multiplies in int32 and scales back to fp32 in one kernel. This is
the kernel ONNX Runtime's ``quantize_dynamic`` output fuses into at load time, emitted directly.
Weights smaller than ``min-weight-elements`` stay fp32: quantizing the activation costs a pass
over it, which a small product does not win back. Only for the onnx target (ONNX Runtime).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass

from . import speed
from .calibration import CalibrationData, model_inputs

from .common import COMMON_OPTIONS, const_float, excluded, is_float_activation, parse_exclude, refuse_quantized
from .qdq import Builder, quantize_embeddings, quantize_weight
from .recipe import recipe_for

log = logging.getLogger("infoptc")


def _dynamic_weight(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The node's weight as [K, N] and its bias [N] (or None), when the node can be replaced."""
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = const_float(node.inputs[1])
        return (w, None) if w is not None and w.ndim == 2 else None
    if node.op == "Gemm" and len(node.inputs) >= 2:
        w = const_float(node.inputs[1])
        if (w is None or w.ndim != 2 or node.attrs.get("transA", 0)
                or float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
            return None
        w = w.T if node.attrs.get("transB", 0) else w
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = const_float(node.inputs[2])
            if bias is None or bias.ndim != 1 or bias.shape[0] != w.shape[1]:
                return None
        return w, bias
    return None


def _bias_add(node: gs.Node, n: int, outputs: set[str]) -> tuple[gs.Node, np.ndarray] | None:
    """The sole consumer Add of a MatMul's output that adds a constant [N] bias."""
    out = node.outputs[0]
    if out.name in outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = const_float(other)
    if bias is None or bias.size != n or bias.shape[-1:] != (n,) or any(d != 1 for d in bias.shape[:-1]):
        return None
    if len(bias.shape) > len(out.shape or []):  # the bias would add a dimension
        return None
    return add, bias.reshape(n)


def _restore(graph: gs.Graph, model) -> None:
    """Put the graph back as ``model`` has it (the fp32 graph the pass started from)."""
    original = to_graph(model)
    graph.nodes = original.nodes
    graph.inputs = original.inputs
    graph.outputs = original.outputs


def _same_k(group: list) -> bool:
    return len({m[1].shape[0] for m in group}) == 1


@register_pass
class QuantizeInt8Dynamic(Pass):
    name = "quantize-int8-dynamic"
    summary = "int8 weights with run-time activation quantization (ONNX Runtime's DynamicQuantizeMatMul)"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        **COMMON_OPTIONS,
        "min-weight-elements": Option(4096, "weights with fewer elements stay fp32"),
        "embeddings": Option(True, "store Gather tables (embeddings) as large as min-weight-elements in int8, one scale per row"),
        "merge-siblings": Option(True, "one kernel for the MatMuls that read the same activation (Q, K, V)"),
        "speed-check": Option(True, "time the int8 model against fp32 on this host and keep fp32 when int8 is slower"),
    }

    @staticmethod
    def _replace(graph: gs.Graph, b: Builder, members: list, qmax: int) -> None:
        """One DynamicQuantizeMatMul for ``members`` (node, w, bias, out, add) that read one input;
        with several, their weights are concatenated along N and the product is split."""
        first = members[0][0]
        x = first.inputs[0]
        w = np.concatenate([m[1] for m in members], axis=1)
        has_bias = any(m[2] is not None for m in members)
        bias = np.concatenate([m[2] if m[2] is not None else np.zeros(m[1].shape[1], np.float32) for m in members])
        q, scale = quantize_weight(w, 1, qmax)
        wname = first.inputs[1].name
        inputs = [x, b.const(f"{wname}_quantized", q), b.const(f"{wname}_scale", scale),
                  b.const(f"{wname}_zero_point", np.zeros(scale.shape, dtype=np.int8))]
        if has_bias:
            inputs.append(b.const(f"{wname}_bias", bias.astype(np.float32)))
        outs = [m[3] for m in members]
        for node, _, _, _, add in members:
            for n in (node, add):
                if n is not None:
                    n.outputs.clear()
                    n.inputs.clear()
        if len(members) == 1:
            b.node("DynamicQuantizeMatMul", f"{first.name}_quant", inputs, outs[0]).domain = "com.microsoft"
            return
        joined = gs.Variable(b.name(f"{first.name}_merged"), dtype=np.float32)
        b.node("DynamicQuantizeMatMul", f"{first.name}_quant_merged", inputs, joined).domain = "com.microsoft"
        sizes = np.array([m[1].shape[1] for m in members], dtype=np.int64)
        split = gs.Node("Split", b.name(f"{first.name}_split"), {"axis": -1}, [joined], outs)
        if graph.opset >= 13:
            split.inputs.append(b.const(f"{first.name}_split_sizes", sizes))
        else:
            split.attrs["split"] = [int(v) for v in sizes]
        graph.nodes.append(split)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        refuse_quantized(graph, self.opts["requantize"])
        recipe = recipe_for(self.opts["isa"])
        exclude = parse_exclude(self.opts["exclude"])
        outputs = {t.name for t in graph.outputs}
        fp32 = from_graph(graph) if self.opts["speed-check"] else None
        b = Builder(graph)
        counters = {"quantized": 0, "bias_absorbed": 0, "too_small": 0, "embeddings": 0, "merged": 0}
        found: dict[int, list] = {}  # id(input) -> [(node, w, bias, out, absorbed add)] in graph order
        for node in list(graph.nodes):
            if excluded(node, exclude) or not node.outputs or not node.inputs or not is_float_activation(node.inputs[0]):
                continue
            weight = _dynamic_weight(node)
            if weight is None:
                continue
            w, bias = weight
            if w.size < self.opts["min-weight-elements"]:
                counters["too_small"] += 1
                continue
            out, add = node.outputs[0], None
            if bias is None and node.op == "MatMul":
                absorbed = _bias_add(node, w.shape[1], outputs)
                if absorbed is not None:
                    add, bias = absorbed
                    out = add.outputs[0]
            found.setdefault(id(node.inputs[0]), []).append((node, w, bias, out, add))
        for group in found.values():
            # siblings reading one activation (attention's Q, K, V) share one quantization of it and
            # one wider GEMM: their weights side by side, the result split back
            runs = [group] if self.opts["merge-siblings"] and len(group) > 1 and _same_k(group) else [[m] for m in group]
            for members in runs:
                self._replace(graph, b, members, recipe.weight_qmax)
                counters["quantized"] += len(members)
                counters["merged"] += len(members) if len(members) > 1 else 0
                counters["bias_absorbed"] += sum(m[4] is not None for m in members)
        if self.opts["embeddings"]:
            counters["embeddings"] = quantize_embeddings(graph, b, self.opts["min-weight-elements"], exclude)
        if not counters["quantized"] and not counters["embeddings"]:
            log.warning("quantize-int8-dynamic: nothing worth quantizing (no MatMul/Gemm with a constant fp32 "
                        "weight of %d elements or more); the model stays fp32", self.opts["min-weight-elements"])
            return PassResult(False, counters)
        if fp32 is not None:
            graph.cleanup().toposort()
            source = ctx.options.get("calibration")
            feed = next(iter(CalibrationData(source, model_inputs(fp32), 1))) if source else speed.sample_feed(fp32)
            timing = speed.compare(fp32, {"int8": from_graph(graph)}, feed)
            ctx.reports[self.name] = {"recipe": recipe.as_dict(), "speed": timing.as_dict()}
            if timing.best is None:
                log.warning("quantize-int8-dynamic: int8 is not faster than fp32 on this host (%s); the model stays "
                            "fp32 (speed-check=false / --no-speed-check quantizes anyway)", timing.summary())
                _restore(graph, fp32)
                return PassResult(True, {"quantized": 0, "kept_fp32_slower": 1})
        ctx.metadata["infoptc.quantization"] = json.dumps(
            {"pass": self.name, "recipe": recipe.as_dict()}, sort_keys=True)
        return PassResult(True, counters)
