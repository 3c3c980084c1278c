"""Which intended int8 regions ONNX Runtime really runs as int8 kernels.

A QDQ model says "this Conv runs in int8" only by convention: ONNX Runtime groups each
DequantizeLinear -> op -> QuantizeLinear into QLinearConv, QLinearMatMul, QGemm, QLinearAdd...
at load time when its rules accept the group, and otherwise runs the op in fp32 between the
conversions, slower than the fp32 model. ``fusion_report`` loads the model in ONNX Runtime with
the optimized graph saved and compares: every op that reads a dequantized activation was meant to
be int8; it is fused if it is gone from the optimized graph, left if it is still there.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import onnx

# ops the quantizers put between DQ and Q, and the int8 kernels ORT turns them into
INTENDED = {"Conv", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool", "AveragePool", "Sigmoid", "Concat"}
FLOAT_OUTPUT = {"MatMul", "Gemm"}  # ops ORT also runs in int8 when only their inputs are dequantized
INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearSigmoid", "QLinearConcat", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "QAttention", "MatMulInteger", "ConvInteger"}


def intended_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes meant to run in int8: QDQ groups (an op whose tensor inputs all come from
    DequantizeLinear, at least one of them of an activation, and whose output goes only to
    QuantizeLinear, or for MatMul/Gemm anywhere in fp32), and nodes that already are int8
    kernels (DynamicQuantizeMatMul)."""
    inits = {t.name for t in model.graph.initializer}
    dq_out = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    graph_outputs = {o.name for o in model.graph.output}

    def grouped(n: onnx.NodeProto) -> bool:
        ins = [i for i in n.input if i and i not in inits]
        if not (ins and all(i in dq_out for i in ins) and any(dq_out[i].input[0] not in inits for i in ins)):
            return False
        if n.op_type in FLOAT_OUTPUT:  # int8 in, fp32 out: MatMulIntegerToFloat / QGemm without a Q
            return True
        return all(o not in graph_outputs and readers.get(o) and set(readers[o]) == {"QuantizeLinear"}
                   for o in n.output[:1])

    return [n for n in model.graph.node
            if (n.op_type in INTENDED and grouped(n)) or n.op_type in INT8_KERNELS]


def fusion_report(model: onnx.ModelProto | str | os.PathLike) -> dict:
    """``{"intended": n, "fused": n, "left_fp32": [node names], "kernels": {op: count}}``."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    intended = intended_nodes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        # QDQ grouping runs at the extended level; 'all' adds layout changes that do not serialize
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = path
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    remaining = {n.name for n in optimized.graph.node if n.op_type in INTENDED}
    left = [n.name for n in intended if n.op_type in INTENDED and n.name in remaining]
    kernels = Counter(n.op_type for n in optimized.graph.node if n.op_type in INT8_KERNELS)
    return {"intended": len(intended), "fused": len(intended) - len(left), "left_fp32": left,
            "kernels": dict(sorted(kernels.items())),
            "conversions": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in optimized.graph.node)}
