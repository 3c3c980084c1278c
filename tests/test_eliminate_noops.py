"""eliminate-noops: each no-op pattern is removed, each look-alike that is not a no-op stays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infoptc
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, get_pass
from infoptc.verify import check_equivalent, run_onnx

F = TP.FLOAT


def make_model(nodes, in_shape, out_shape, inits=None, opset=17, dtype=F):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", dtype, in_shape)],
        [helper.make_tensor_value_info("y", dtype, out_shape)],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def node(op, *inputs, out="t", **attrs):
    return helper.make_node(op, list(inputs), [out], **attrs)


def i64(*v):
    return np.array(v, np.int64)


def f32(v):
    return np.array(v, np.float32)


def optimize(model, passes="eliminate-noops"):
    artifact = infoptc.compile(model, passes=passes)
    counters: Counter = Counter()
    for record in artifact.pass_records:
        if record.name == "eliminate-noops":
            counters.update(record.counters)
    return artifact.model, counters


# Each case: the no-op node(s) feed a Relu, so that removal is visible; a pair that cancels is
# removed by bypassing its second node (the first then dies).
# (id, counter, nodes, input shape, output shape, initializers)
REMOVED = [
    ("identity", "removed_identity", [node("Identity", "x")], [2, 3], [2, 3], {}),
    ("cast-same-type", "removed_cast", [node("Cast", "x", to=F)], [2, 3], [2, 3], {}),
    ("reshape-same", "removed_reshape", [node("Reshape", "x", "s")], [2, 3], [2, 3], {"s": i64(2, 3)}),
    ("reshape-zero-copy", "removed_reshape", [node("Reshape", "x", "s")], ["n", 3], ["n", 3], {"s": i64(0, 3)}),
    ("reshape-minus-one", "removed_reshape", [node("Reshape", "x", "s")], ["n", 3], ["n", 3], {"s": i64(-1, 3)}),
    ("flatten-2d", "removed_flatten", [node("Flatten", "x", axis=1)], ["n", 3], ["n", 3], {}),
    ("transpose-identity", "removed_transpose", [node("Transpose", "x", perm=[0, 1])], [2, 3], [2, 3], {}),
    ("pad-zeros", "removed_pad", [node("Pad", "x", "p")], [2, 3], [2, 3], {"p": i64(0, 0, 0, 0)}),
    ("mul-one", "removed_mul", [node("Mul", "x", "one")], [2, 3], [2, 3], {"one": f32([1, 1, 1])}),
    ("mul-one-left", "removed_mul", [node("Mul", "one", "x")], [2, 3], [2, 3], {"one": f32(1)}),
    ("div-one", "removed_div", [node("Div", "x", "one")], [2, 3], [2, 3], {"one": f32([[1], [1]])}),
    ("add-negative-zero", "removed_add", [node("Add", "x", "z")], [2, 3], [2, 3], {"z": f32(-0.0)}),
    ("sub-zero", "removed_sub", [node("Sub", "x", "z")], [2, 3], [2, 3], {"z": f32([0, 0, 0])}),
    ("slice-all", "removed_slice", [node("Slice", "x", "st", "en")], ["n", 3], ["n", 3],
     {"st": i64(0, 0), "en": i64(2**63 - 1, 3)}),
    ("concat-one", "removed_concat", [node("Concat", "x", axis=0)], [2, 3], [2, 3], {}),
    ("expand-same", "removed_expand", [node("Expand", "x", "s")], [2, 3], [2, 3], {"s": i64(1, 3)}),
    ("unsqueeze-squeeze", "removed_squeeze", [node("Unsqueeze", "x", "a", out="u"), node("Squeeze", "u", "a")],
     [2, 3], [2, 3], {"a": i64(1)}),
    ("squeeze-unsqueeze-negative-axes", "removed_unsqueeze",
     [node("Squeeze", "x", "a", out="q"), node("Unsqueeze", "q", "b")],
     [2, 1, 3], [2, 1, 3], {"a": i64(1), "b": i64(-2)}),
]


@pytest.mark.parametrize("counter,nodes,in_shape,out_shape,inits", [c[1:] for c in REMOVED],
                         ids=[c[0] for c in REMOVED])
def test_noop_is_removed(counter, nodes, in_shape, out_shape, inits):
    m = make_model(nodes + [node("Relu", nodes[-1].output[0], out="y")], in_shape, out_shape, inits)
    out, counters = optimize(m)
    assert op_histogram(out) == {"Relu": 1}
    assert counters == {counter: 1}
    check_equivalent(m, out, Contract.EXACT)


KEPT = [
    ("reshape-other", [node("Reshape", "x", "s")], [2, 3], [3, 2], {"s": i64(3, 2)}),
    ("reshape-symbolic", [node("Reshape", "x", "s")], ["n", 3], ["n", 3], {"s": i64(2, 3)}),
    ("transpose-swap", [node("Transpose", "x", perm=[1, 0])], [2, 3], [3, 2], {}),
    ("pad-some", [node("Pad", "x", "p")], [2, 3], [2, 4], {"p": i64(0, 0, 0, 1)}),
    ("mul-two", [node("Mul", "x", "c")], [2, 3], [2, 3], {"c": f32([1, 2, 1])}),
    ("mul-one-broadcasts", [node("Mul", "x", "one")], [3], [2, 3], {"one": f32([[1, 1, 1], [1, 1, 1]])}),
    ("mul-one-symbolic", [node("Mul", "x", "one")], ["n"], [3], {"one": f32([1, 1, 1])}),
    ("div-one-left", [node("Div", "one", "x")], [3], [3], {"one": f32(1)}),
    ("add-positive-zero", [node("Add", "x", "z")], [3], [3], {"z": f32(0.0)}),
    ("sub-negative-zero", [node("Sub", "x", "z")], [3], [3], {"z": f32(-0.0)}),
    ("slice-part", [node("Slice", "x", "st", "en")], [4], [3], {"st": i64(1), "en": i64(4)}),
    ("slice-symbolic-end", [node("Slice", "x", "st", "en")], ["n"], ["m"], {"st": i64(0), "en": i64(5)}),
    ("expand-grows", [node("Expand", "x", "s")], [1, 3], [2, 3], {"s": i64(2, 3)}),
    ("squeeze-unsqueeze-other-axes", [node("Squeeze", "x", "a", out="q"), node("Unsqueeze", "q", "b")],
     [2, 1, 3], [2, 3, 1], {"a": i64(1), "b": i64(2)}),
]


@pytest.mark.parametrize("nodes,in_shape,out_shape,inits", [c[1:] for c in KEPT], ids=[c[0] for c in KEPT])
def test_lookalike_is_kept(nodes, in_shape, out_shape, inits):
    m = make_model(nodes + [node("Relu", nodes[-1].output[0], out="y")], in_shape, out_shape, inits)
    out, counters = optimize(m)
    assert op_histogram(out) == op_histogram(m)
    assert not counters


def test_signed_zero_option_and_contract():
    m = make_model([node("Neg", "x", out="n"), node("Add", "n", "z", out="y")], [3], [3], {"z": f32(0.0)})
    out, _ = optimize(m, "eliminate-noops{no-signed-zeros=true}")
    assert op_histogram(out) == {"Neg": 1}
    assert get_pass("eliminate-noops").contract == Contract.EXACT
    assert get_pass("eliminate-noops")(no_signed_zeros=True).contract == Contract.REASSOCIATING
    feeds = {"x": f32([0.0, 1.0, -2.0])}
    ref, got = run_onnx(m, feeds)["y"], run_onnx(out, feeds)["y"]
    np.testing.assert_array_equal(ref, got)  # equal as numbers...
    assert np.signbit(got[0]) and not np.signbit(ref[0])  # ...but -0.0 + 0.0 is +0.0: why it is opt-in


def test_reshape_chain_collapses_into_one_reshape():
    m = make_model([node("Reshape", "x", "s1", out="a"), node("Flatten", "a", axis=1, out="b"),
                    node("Reshape", "b", "s2", out="y")], [2, 3, 4], [4, 6],
                   {"s1": i64(6, 4), "s2": i64(4, -1)})
    out, counters = optimize(m)
    assert op_histogram(out) == {"Reshape": 1}
    assert counters["collapsed_reshapes"] == 1
    check_equivalent(m, out, Contract.EXACT)


def test_reshape_with_copied_dim_is_not_collapsed():
    # The 0 in s2 copies a dim of the intermediate (6), not of x (2): not collapsible.
    m = make_model([node("Reshape", "x", "s1", out="a"), node("Reshape", "a", "s2", out="y")],
                   [2, 3, 4], [6, 2, 2], {"s1": i64(6, 4), "s2": i64(0, 2, -1)})
    out, counters = optimize(m)
    assert op_histogram(out) == {"Reshape": 2}
    assert not counters


def test_graph_output_name_survives_removal():
    m = make_model([node("Relu", "x", out="r"), node("Identity", "r", out="y")], [3], [3])
    out, counters = optimize(m)
    assert op_histogram(out) == {"Relu": 1}
    assert [o.name for o in out.graph.output] == ["y"]
    assert counters == {"removed_identity": 1}


def test_input_to_output_identity_stays():
    m = make_model([node("Identity", "x", out="y")], [3], [3])
    out, _ = optimize(m)
    assert op_histogram(out) == {"Identity": 1}


def test_unknown_and_foreign_ops_are_left_alone():
    m = make_model([node("Identity", "x", out="i"),
                    helper.make_node("FusedGemm", ["i"], ["y"], domain="com.microsoft")], [3], [3])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out, _ = optimize(m)
    assert op_histogram(out) == {"com.microsoft::FusedGemm": 1}


def test_outer_scope_references_in_subgraphs_stay_intact():
    # The then-branch returns an outer value through an Identity: removing it would make the
    # branch output an outer-scope name. The else-branch's inner Identity can go.
    vi = lambda n: helper.make_tensor_value_info(n, F, [3])
    then_g = helper.make_graph([node("Identity", "h", out="t_out")], "then", [], [vi("t_out")])
    else_g = helper.make_graph([node("Neg", "h", out="e1"), node("Identity", "e1", out="e2"),
                                node("Identity", "e2", out="e_out")], "else", [], [vi("e_out")])
    nodes = [node("Relu", "x", out="h"), node("Identity", "h", out="h2"),
             node("ReduceSum", "h2", out="s", keepdims=0), node("Greater", "s", "zero", out="c"),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [3], [3], {"zero": f32(0.5)})
    out, counters = optimize(m)
    assert op_histogram(out, subgraphs=False) == {"Relu": 1, "ReduceSum": 1, "Greater": 1, "If": 1}
    assert counters == {"removed_identity": 3}
    assert op_histogram(out) == {"Relu": 1, "ReduceSum": 1, "Greater": 1, "If": 1, "Identity": 1, "Neg": 1}
    for x in (f32([1, 2, 3]), f32([-1, 0.2, 0.1])):
        np.testing.assert_array_equal(run_onnx(m, {"x": x})["y"], run_onnx(out, {"x": x})["y"])


def test_mlp_golden_noops(golden):
    m = onnx.load(golden("mlp"))
    out, counters = optimize(m)
    assert {"Dropout", "Identity", "Cast"}.isdisjoint(op_histogram(out))
    assert counters == {"removed_dropout": 1, "removed_identity": 2, "removed_cast": 1}
    check_equivalent(m, out, Contract.EXACT)
