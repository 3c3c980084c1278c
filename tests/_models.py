"""Tiny hand-built models for core tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def model(nodes, inputs, outputs, initializers=(), opset=17, **kwargs) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], **kwargs)
    m.ir_version = 8
    return m


def fvi(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, shape)


def chain(extra_nodes=()) -> onnx.ModelProto:
    """x -> Identity -> MatMul(W) -> Dropout -> Cast(float) -> Relu -> y, plus a dead Neg."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")
    nodes = [
        h.make_node("Identity", ["x"], ["a"], name="id0"),
        h.make_node("MatMul", ["a", "W"], ["b"], name="mm"),
        h.make_node("Dropout", ["b"], ["c"], name="drop"),
        h.make_node("Cast", ["c"], ["d"], to=T.FLOAT, name="cast"),
        h.make_node("Relu", ["d"], ["y"], name="relu"),
        h.make_node("Neg", ["d"], ["dead"], name="dead"),
        *extra_nodes,
    ]
    return model(nodes, [fvi("x", ["batch", 4])], [fvi("y", ["batch", 3])], [w])


def double_neg() -> onnx.ModelProto:
    nodes = [
        h.make_node("Relu", ["x"], ["r"], name="relu"),
        h.make_node("Neg", ["r"], ["n1"], name="neg1"),
        h.make_node("Neg", ["n1"], ["n2"], name="neg2"),
        h.make_node("Sigmoid", ["n2"], ["y"], name="sig"),
    ]
    return model(nodes, [fvi("x", [2, 3])], [fvi("y", [2, 3])])


def with_subgraph() -> onnx.ModelProto:
    """An If whose branches read an outer-scope value and contain Identity nodes."""
    then_g = h.make_graph([h.make_node("Identity", ["r"], ["t0"]), h.make_node("Add", ["t0", "r"], ["t_out"])],
                          "then", [], [fvi("t_out", [2, 3])])
    else_g = h.make_graph([h.make_node("Neg", ["r"], ["e_out"])], "else", [], [fvi("e_out", [2, 3])])
    nodes = [
        h.make_node("Relu", ["x"], ["r"], name="relu"),
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        h.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
    ]
    zero = nh.from_array(np.array(0, dtype=np.float32), "zero")
    return model(nodes, [fvi("x", [2, 3])], [fvi("y", [2, 3])], [zero])
