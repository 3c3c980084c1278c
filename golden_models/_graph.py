"""Small helper that emits ONNX graphs the way ``torch.onnx.export`` names them.

Node names look like ``/layer1/layer1.0/conv1/Conv`` (module scope + op type,
with ``_1``, ``_2``... suffixes for repeated ops in one scope) and node outputs
look like ``/layer1/layer1.0/conv1/Conv_output_0``.  Constants are emitted as
``Constant`` nodes (as the exporter does), parameters as initializers with
dotted PyTorch parameter names (``layer1.0.conv1.weight``).

Everything here is insertion-ordered and free of time / global random state so
that the serialized bytes are identical from build to build.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER_NAME = "infoptc.golden_models"
PRODUCER_VERSION = "1.0"


class TorchStyleGraph:
    """Accumulates nodes / initializers with torch-exporter style names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._init_names: set[str] = set()
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------ names
    def _node_name(self, scope: str, op_type: str) -> str:
        base = f"{scope}/{op_type}"
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ------------------------------------------------------------------ nodes
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str = "",
        outputs: Sequence[str] | int = 1,
        **attrs,
    ):
        """Append a node; returns its output name (or list of names if several)."""
        name = self._node_name(scope, op_type)
        if isinstance(outputs, int):
            outs = [f"{name}_output_{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, scope: str = "", dtype=None) -> str:
        """A ``Constant`` node holding ``value`` (0-d for Python scalars)."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self._node_name(scope, "Constant")
        out = f"{name}_output_0"
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=name, value=numpy_helper.from_array(arr, name="")
            )
        )
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        """Register an initializer (parameter / buffer)."""
        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name}")
        self._init_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name=name))
        return name

    # ------------------------------------------------------------- finishing
    def make_model(
        self,
        graph_name: str,
        inputs: Iterable[onnx.ValueInfoProto],
        outputs: Iterable[onnx.ValueInfoProto],
        doc_string: str = "",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, list(inputs), list(outputs), initializer=self.initializers
        )
        return finish_model(graph, doc_string)


def finish_model(graph: onnx.GraphProto, doc_string: str = "") -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=doc_string,
    )
    model.ir_version = IR_VERSION
    return model


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """Seeded normal weights (element-wise ops only, so bit-exact everywhere)."""
    return f32(rng.standard_normal(shape) * std)


def uniform(rng: np.random.Generator, shape, low: float, high: float) -> np.ndarray:
    return f32(rng.uniform(low, high, shape))


def tensor_info(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


def linear(g: TorchStyleGraph, rng, x: str, scope: str, pname: str, fin: int, fout: int,
           std: float = 0.02, bias_std: float = 0.02) -> str:
    """A torch Linear/Conv1D as exported: MatMul by an [in, out] weight, then Add of the bias."""
    w = g.init(f"{pname}.weight", normal(rng, (fin, fout), std))
    b = g.init(f"{pname}.bias", normal(rng, (fout,), bias_std))
    y = g.op("MatMul", [x, w], scope)
    return g.op("Add", [b, y], scope)


def dim(g: TorchStyleGraph, x: str, scope: str, index: int) -> str:
    """``x.size(index)`` -> 0-d int64 (Shape + Gather with a scalar index)."""
    shape = g.op("Shape", [x], scope)
    idx = g.const(index, scope, np.int64)
    return g.op("Gather", [shape, idx], scope, axis=0)
