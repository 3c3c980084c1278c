"""fuse-bias-gelu: Gelu(x + bias) -> com.microsoft BiasGelu / FastGelu(x, bias)."""

from __future__ import annotations

import infoptc
import numpy as np
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
H = 12
RNG = np.random.default_rng(5)


def gelu_model(kind, bias_shape=(H,), opset=20):
    """x @ W + b, then the GELU ``kind``: standard / standard_tanh (ai.onnx, opset 20), contrib / fast."""
    inits = [numpy_helper.from_array(RNG.standard_normal((H, H)).astype(np.float32), "W"),
             numpy_helper.from_array(RNG.standard_normal(bias_shape).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["mb"])]
    if kind == "standard":
        nodes.append(helper.make_node("Gelu", ["mb"], ["y"]))
    elif kind == "standard_tanh":
        nodes.append(helper.make_node("Gelu", ["mb"], ["y"], approximate="tanh"))
    elif kind == "contrib":
        nodes.append(helper.make_node("Gelu", ["mb"], ["y"], domain="com.microsoft"))
    else:
        nodes.append(helper.make_node("FastGelu", ["mb"], ["y"], domain="com.microsoft"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, H])],
                              [helper.make_tensor_value_info("y", F, [2, 3, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def fuse(model, **kw):
    art = infoptc.compile(model, passes="fuse-bias-gelu", **kw)
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("kind, op, rule", [("standard", "BiasGelu", "bias_gelu"), ("contrib", "BiasGelu", "bias_gelu"),
                                            ("standard_tanh", "FastGelu", "bias_fast_gelu"),
                                            ("fast", "FastGelu", "bias_fast_gelu")])
def test_the_bias_add_joins_the_gelu(kind, op, rule):
    model = gelu_model(kind)
    out, counters = fuse(model)
    assert op_histogram(out) == {"MatMul": 1, f"com.microsoft::{op}": 1}
    assert counters["fused"] == 1 and counters[rule] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_a_bias_that_is_not_a_last_axis_vector_stays():
    out, counters = fuse(gelu_model("standard", bias_shape=(3, H)))
    assert op_histogram(out)["Add"] == 1 and counters["rejected"] == 1


def test_standard_policy_keeps_add_and_gelu():
    model = gelu_model("standard")
    out, counters = fuse(model, ops="standard")
    assert op_histogram(out) == {"MatMul": 1, "Add": 1, "Gelu": 1} and counters["rejected"] == 1
