"""A small MLP (MatMul + Add, Gemm) for the weight-compression tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def mlp(seed: int = 0, k: int = 64, n: int = 96, weights=None) -> onnx.ModelProto:
    """x [2, 5, k] -> MatMul W1 [k, n] -> Add b -> Relu -> Reshape [10, n] -> Gemm (transB) W2 [k, n] -> y."""
    rng = np.random.default_rng(seed)
    w1, w2 = weights if weights is not None else (rng.standard_normal((k, n)), rng.standard_normal((k, n)))
    inits = [nh.from_array(np.asarray(w1, np.float32), "W1"), nh.from_array(rng.standard_normal(n).astype(np.float32), "b1"),
             nh.from_array(np.array([10, n], np.int64), "shape"), nh.from_array(np.asarray(w2, np.float32), "W2"),
             nh.from_array(rng.standard_normal(k).astype(np.float32), "b2")]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m"], name="mm"), h.make_node("Add", ["m", "b1"], ["a"], name="add"),
             h.make_node("Relu", ["a"], ["r"], name="relu"), h.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "W2", "b2"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 5, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, [10, k])], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def feed(k: int = 64, seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, k)).astype(np.float32)}
