"""fuse-transposes: Transpose pairs cancel or merge, also across elementwise ops."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def model_of(nodes, out_shape, inits=(), outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info(o, F, out_shape) for o in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def t(src, out, perm=None):
    return helper.make_node("Transpose", [src], [out], **({"perm": perm} if perm is not None else {}))


def fuse(model):
    art = infoptc.compile(model, passes="fuse-transposes")
    return art.model, art.pass_records[0].counters


def test_inverse_transposes_cancel():
    model = model_of([t("x", "a", [0, 2, 3, 1]), t("a", "b", [0, 3, 1, 2]), helper.make_node("Relu", ["b"], ["y"])],
                     [2, 3, 4, 5])
    out, counters = fuse(model)
    assert op_histogram(out) == {"Relu": 1}
    assert counters["merge_transposes"] == 1
    check_equivalent(model, out, Contract.EXACT)


def test_two_transposes_merge_into_one():
    # gpt's key path: [0, 2, 1, 3] then [0, 1, 3, 2] is one [0, 2, 3, 1]
    model = model_of([t("x", "a", [0, 2, 1, 3]), t("a", "y", [0, 1, 3, 2])], [2, 4, 5, 3])
    out, _ = fuse(model)
    (node,) = out.graph.node
    assert node.op_type == "Transpose" and list(node.attribute[0].ints) == [0, 2, 3, 1]
    assert node.output[0] == "y"
    check_equivalent(model, out, Contract.EXACT)


def test_default_perms_reverse_each_other():
    model = model_of([t("x", "a"), t("a", "y")], [2, 3, 4, 5])
    out, _ = fuse(model)
    assert op_histogram(out) == {"Identity": 1}  # the graph output keeps its name
    check_equivalent(model, out, Contract.EXACT)


def test_shared_inner_transpose_still_merges_and_stays():
    model = model_of([t("x", "a", [0, 2, 1, 3]), t("a", "y", [0, 2, 1, 3]), helper.make_node("Relu", ["a"], ["z"])],
                     [2, 3, 4, 5], outputs=("y",))
    model.graph.output.append(helper.make_tensor_value_info("z", F, [2, 4, 3, 5]))
    out, _ = fuse(model)
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1, "Identity": 1}
    check_equivalent(model, out, Contract.EXACT)


@pytest.mark.parametrize("middle", ["Relu", "Sigmoid", "scalar_mul", "scalar_sub_first"])
def test_transposes_meet_through_elementwise_ops(middle):
    inits = [numpy_helper.from_array(np.float32(1.5), "c")]
    if middle == "scalar_mul":
        mid = helper.make_node("Mul", ["a", "c"], ["m"])
    elif middle == "scalar_sub_first":
        mid = helper.make_node("Sub", ["c", "a"], ["m"])
    else:
        mid = helper.make_node(middle, ["a"], ["m"])
    model = model_of([t("x", "a", [0, 3, 1, 2]), mid, t("m", "b", [0, 2, 3, 1]), helper.make_node("Neg", ["b"], ["y"])],
                     [2, 3, 4, 5], inits)
    out, counters = fuse(model)
    assert "Transpose" not in op_histogram(out)
    assert counters["sink_transpose"] == 1
    check_equivalent(model, out, Contract.EXACT)


def test_not_sunk_through_a_shared_op_or_a_tensor_operand():
    shared = model_of([t("x", "a", [0, 3, 1, 2]), helper.make_node("Relu", ["a"], ["m"]), t("m", "y", [0, 2, 3, 1]),
                       helper.make_node("Neg", ["m"], ["z"])], [2, 3, 4, 5])
    shared.graph.output.append(helper.make_tensor_value_info("z", F, [2, 5, 3, 4]))
    tensor = model_of([t("x", "a", [0, 3, 1, 2]), helper.make_node("Mul", ["a", "c"], ["m"]), t("m", "y", [0, 2, 3, 1])],
                      [2, 3, 4, 5], [numpy_helper.from_array(np.ones((4,), np.float32), "c")])
    for model in (shared, tensor):
        out, counters = fuse(model)
        assert op_histogram(out)["Transpose"] == 2 and counters["fused"] == 0


def test_golden_gpt_key_transposes_merge(golden):
    gpt = onnx.load(golden("gpt"))
    out, counters = fuse(gpt)
    assert counters["merge_transposes"] == 2  # one K^T per attention block
    assert op_histogram(out)["Transpose"] == op_histogram(gpt)["Transpose"] - 2
    check_equivalent(gpt, out, Contract.EXACT)
