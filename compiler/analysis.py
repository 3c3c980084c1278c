"""Model facts for `infoptc inspect` and the compile summary: op histogram, parameters,
size, and a FLOPs estimate from inferred shapes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import ir
from .errors import first_line
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


class FlopsUnknown(ValueError):
    """The FLOPs of a model cannot be counted: some node's output shape stays unknown. The
    message says why (which node, and why shape inference fell short)."""


def _shape_map(model: onnx.ModelProto, bind: dict[str, int]) -> tuple[dict[str, tuple], str | None]:
    """Static shapes of every value, symbolic dims bound (default 1) before inference, and why
    ONNX Runtime's symbolic shape inference could not be used (None when it was)."""
    if ir.is_large(model):
        raise FlopsUnknown("the model is over 2 GB: shapes are not inferred")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value < 0:
                d.dim_value = bind.get(d.dim_param, 1)
    m, fallback = _infer_static_shapes(m)
    shapes = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for t in m.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes, fallback


def _infer_static_shapes(m: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """ONNX Runtime's symbolic shape inference resolves more (Expand, Reshape from computed
    shapes) than onnx's; onnx's serves where it fails (unknown ops, control flow), and the
    reason comes back so that a count left incomplete can say why."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as e:  # it needs sympy, a dependency of ours (ONNX Runtime >= 1.32 dropped it)
        reason = f"ONNX Runtime's symbolic shape inference is unavailable ({first_line(e)})"
    else:
        try:
            return _symbolic_shapes(SymbolicShapeInference, m), None
        except Exception as e:  # noqa: BLE001 - it raises anything on ops it does not know
            reason = f"ONNX Runtime's symbolic shape inference failed ({first_line(e)})"
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True), reason
    except Exception as e:  # noqa: BLE001
        return m, f"{reason}; onnx's shape inference failed too ({first_line(e)})"


def _symbolic_shapes(inference, m: onnx.ModelProto) -> onnx.ModelProto:
    """``SymbolicShapeInference.infer_shapes(m, auto_merge=True)`` step by step: where some shape
    stays unknown, the public function saves the model as sym_shape_infer_temp.onnx in the
    current folder before raising; here the shapes it found come back and nothing is written."""
    if next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0) < 7:
        raise ValueError("it supports opset 7 and later only")
    try:
        run = inference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
        run._preprocess(m)
        while run.run_:
            run._infer_impl()
        run._update_output_from_vi()
        return run.out_mp_
    except AttributeError:  # another ONNX Runtime's internals: the public function, in a scratch folder
        import os
        import tempfile

        here = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                return inference.infer_shapes(m, auto_merge=True)
            finally:
                os.chdir(here)


def estimate_flops(model: onnx.ModelProto, bind: dict[str, int] | None = None) -> int:
    """Multiply-adds count twice. MatMul/Gemm/Conv exactly from shapes; other ops one FLOP per
    output element. Raises ``FlopsUnknown`` when a node's output shape cannot be inferred: a
    count that skipped it would be wrong, not approximate."""
    shapes, fallback = _shape_map(model, bind or {})
    total = 0
    for node in model.graph.node:
        if not node.output or not node.output[0]:
            continue
        out = shapes.get(node.output[0])
        if out is None:
            raise FlopsUnknown(f"no shape inferred for {node.output[0]!r} (output of {node.op_type} node "
                               f"{node.name or '<unnamed>'!r})" + (f"; {fallback}" if fallback else ""))
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


def flops_or_reason(model: onnx.ModelProto, bind: dict[str, int] | None = None) -> tuple[int | None, str | None]:
    """``(flops, None)``, or ``(None, why the count is unknown)``."""
    try:
        return estimate_flops(model, bind), None
    except FlopsUnknown as e:
        return None, str(e)


# Initializers up to this many elements keep their values in a skeleton (shape constants that
# Reshape, Expand or Slice read); larger ones become inputs of the same type and shape.
SKELETON_MAX_ELEMENTS = 1024


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights, for counting FLOPs later (a TVM artifact keeps one
    in its manifest): every initializer over ``SKELETON_MAX_ELEMENTS`` elements is replaced by a
    graph input of its dtype and shape, which shape inference treats alike."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    keep = [t for t in graph.initializer if int(np.prod(t.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS]
    declared = {vi.name for vi in graph.input}
    for t in graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS and t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return light


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
    flops: int | None = None  # None: unknown, see flops_unknown
    flops_unknown: str | None = None
    functions: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def summarize(model: onnx.ModelProto) -> ModelSummary:
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    flops, flops_unknown = flops_or_reason(model)
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
        flops=flops,
        flops_unknown=flops_unknown,
        functions=len(model.functions),
    )
