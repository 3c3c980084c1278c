"""Model facts for `infoptc inspect` and the compile summary: op histogram, parameters,
size, and a FLOPs estimate from inferred shapes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import ir
from .verify import tensor_specs


def op_histogram(model: onnx.ModelProto, subgraphs: bool = True) -> Counter:
    """Node count per op type (``domain::Op`` outside the standard domain)."""
    graphs = ir.iter_graphs(model.graph) if subgraphs else [model.graph]
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                   for g in graphs for n in g.node)


def node_count(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in ir.iter_graphs(model.graph))


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for g in ir.iter_graphs(model.graph) for t in g.initializer)


def model_bytes(model: onnx.ModelProto) -> int:
    return ir.model_bytes(model)


def _shape_map(model: onnx.ModelProto, bind: dict[str, int]) -> dict[str, tuple]:
    """Static shapes of every value, symbolic dims bound (default 1) before inference."""
    if ir.is_large(model):
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = bind.get(d.dim_param, 1)
    m = _infer_static_shapes(m)
    shapes = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _infer_static_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference resolves more (Expand, Reshape from computed
    shapes) than onnx's; fall back to onnx's where it fails (unknown ops, control flow)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(m, auto_merge=True)
    except Exception:
        pass
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return m


def estimate_flops(model: onnx.ModelProto, bind: dict[str, int] | None = None) -> int:
    """Multiply-adds count twice. MatMul/Gemm/Conv exactly from shapes; other ops one FLOP per
    output element. Values whose shape is unknown count zero."""
    shapes = _shape_map(model, bind or {})
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        n_out = int(np.prod(out, dtype=np.int64))
        if node.op_type in ("MatMul", "Gemm") and node.input[0] in shapes:
            a = shapes[node.input[0]]
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
            total += 2 * n_out * k
        elif node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes:
            w = shapes[node.input[1]]
            total += 2 * n_out * int(np.prod(w[1:], dtype=np.int64))
        else:
            total += n_out
    return int(total)


@dataclass
class ModelSummary:
    opset: int
    ir_version: int
    producer: str
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    nodes: int = 0
    histogram: dict = field(default_factory=dict)
    initializers: int = 0
    parameters: int = 0
    bytes: int = 0
    flops: int = 0
    functions: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def summarize(model: onnx.ModelProto) -> ModelSummary:
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    spec = lambda s: {"name": s.name, "dtype": s.dtype, "shape": list(s.shape) if s.shape is not None else None}  # noqa: E731
    return ModelSummary(
        opset=opset,
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=[spec(s) for s in tensor_specs(model, "input")],
        outputs=[spec(s) for s in tensor_specs(model, "output")],
        nodes=node_count(model),
        histogram=dict(sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0]))),
        initializers=sum(len(g.initializer) for g in ir.iter_graphs(model.graph)),
        parameters=parameter_count(model),
        bytes=model_bytes(model),
        flops=estimate_flops(model),
        functions=len(model.functions),
    )
