"""cse: duplicated computations merge; anything that only looks the same stays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infoptc
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, PassContext, PassManager, get_pass
from infoptc.verify import check_equivalent, run_onnx

F = TP.FLOAT


def make_model(nodes, inputs, outputs, inits=None):
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vi(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, F, list(shape))


def node(op, *inputs, out, **attrs):
    return helper.make_node(op, list(inputs), [out], **attrs)


def optimize(model, passes="cse"):
    artifact = infoptc.compile(model, passes=passes)
    counters: Counter = Counter()
    for record in artifact.pass_records:
        if record.name == "cse":
            counters.update(record.counters)
    return artifact.model, counters


def test_duplicated_chain_merges_in_one_sweep():
    m = make_model([node("Relu", "x", out="a1"), node("Exp", "a1", out="b1"),
                    node("Relu", "x", out="a2"), node("Exp", "a2", out="b2"),
                    node("Add", "b1", "b2", out="y")], [vi("x")], [vi("y")])
    out, counters = optimize(m)
    assert op_histogram(out) == {"Relu": 1, "Exp": 1, "Add": 1}
    assert counters == {"merged_nodes": 2, "merged_relu": 1, "merged_exp": 1}
    assert get_pass("cse").contract == Contract.EXACT
    check_equivalent(m, out, Contract.EXACT)


def test_equal_constants_count_as_the_same_input():
    m = make_model([node("Constant", out="k1", value=numpy_helper.from_array(np.float32(2.0))),
                    node("Constant", out="k2", value=numpy_helper.from_array(np.float32(2.0))),
                    node("Mul", "x", "k1", out="m1"), node("Mul", "x", "k2", out="m2"),
                    node("Add", "x", "c1", out="a1"), node("Add", "x", "c2", out="a2"),
                    node("Sum", "m1", "m2", "a1", "a2", out="y")], [vi("x")], [vi("y")],
                   inits={"c1": np.ones(3, np.float32), "c2": np.ones(3, np.float32)})
    out, counters = optimize(m)
    assert op_histogram(out) == {"Constant": 1, "Mul": 1, "Add": 1, "Sum": 1}
    assert counters["merged_constant"] == 1 and counters["merged_add"] == 1
    check_equivalent(m, out, Contract.EXACT)


def test_different_attributes_or_constants_do_not_merge():
    m = make_model([node("LeakyRelu", "x", out="p", alpha=0.0), node("LeakyRelu", "x", out="n", alpha=-0.0),
                    node("Transpose", "x", out="t1", perm=[1, 0]), node("Transpose", "x", out="t2", perm=[1, 0]),
                    node("Add", "x", "c1", out="a1"), node("Add", "x", "c2", out="a2"),
                    node("Sum", "p", "n", "a1", "a2", out="y"), node("Sum", "t1", "t2", out="z")],
                   [vi("x")], [vi("y"), vi("z", (3, 2))],
                   inits={"c1": np.zeros(3, np.float32), "c2": -np.zeros(3, np.float32)})
    out, counters = optimize(m)
    # only the Transposes are the same; 0.0 vs -0.0 (attribute or constant) stay apart
    assert op_histogram(out) == {"LeakyRelu": 2, "Transpose": 1, "Add": 2, "Sum": 2}
    assert counters == {"merged_nodes": 1, "merged_transpose": 1}


def test_random_ops_never_merge():
    m = make_model([node("RandomNormalLike", "x", out="r1"), node("RandomNormalLike", "x", out="r2"),
                    node("Sub", "r1", "r2", out="y")], [vi("x")], [vi("y")])
    out, counters = optimize(m)
    assert op_histogram(out)["RandomNormalLike"] == 2
    assert counters == {"merged_nodes": 0}


def test_graph_outputs_keep_their_names():
    # Both duplicates are outputs: both stay. One duplicate is an output: its name survives.
    m = make_model([node("Relu", "x", out="y"), node("Relu", "x", out="z"),
                    node("Exp", "x", out="e1"), node("Exp", "x", out="w"), node("Neg", "e1", out="v")],
                   [vi("x")], [vi("y"), vi("z"), vi("w"), vi("v")])
    out, counters = optimize(m)
    assert op_histogram(out) == {"Relu": 2, "Exp": 1, "Neg": 1}
    assert [o.name for o in out.graph.output] == ["y", "z", "w", "v"]
    assert counters["merged_exp"] == 1
    check_equivalent(m, out, Contract.EXACT)


def test_outer_duplicates_used_by_a_subgraph():
    vi3 = lambda n: vi(n, (3,))
    then_g = helper.make_graph([node("Neg", "r2", out="t")], "then", [], [vi3("t")])
    else_g = helper.make_graph([node("Neg", "r2", out="e1"), node("Neg", "e1", out="e")], "else", [], [vi3("e")])
    m = make_model([node("Relu", "x", out="r1"), node("Relu", "x", out="r2"),
                    node("ReduceSum", "r1", out="s", keepdims=0), node("Greater", "s", "half", out="c"),
                    helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi3("x")], [vi3("y")], inits={"half": np.float32(0.5)})
    out, counters = optimize(m)
    # r2 (read only inside the branches) merges into r1; the branches' Negs are not compared
    assert op_histogram(out, subgraphs=False) == {"Relu": 1, "ReduceSum": 1, "Greater": 1, "If": 1}
    assert op_histogram(out)["Neg"] == 3
    assert counters == {"merged_nodes": 1, "merged_relu": 1}
    for x in (np.array([1, 2, 3], np.float32), np.array([-1, 0.1, 0.2], np.float32)):
        np.testing.assert_array_equal(run_onnx(m, {"x": x})["y"], run_onnx(out, {"x": x})["y"])


def test_overridable_initializers_are_not_compared_by_value():
    x = gs.Variable("x", np.float32, (3,))
    w = gs.Constant("w", np.ones(3, np.float32))  # a graph input: a user may feed another value
    c = gs.Constant("c", np.ones(3, np.float32))
    a1, a2, y = (gs.Variable(n, np.float32, (3,)) for n in ("a1", "a2", "y"))
    graph = gs.Graph(nodes=[gs.Node("Add", inputs=[x, w], outputs=[a1]), gs.Node("Add", inputs=[x, c], outputs=[a2]),
                            gs.Node("Mul", inputs=[a1, a2], outputs=[y])], inputs=[x, w], outputs=[y], opset=17)
    (record,) = PassManager("cse").run(graph, PassContext())
    assert [n.op for n in graph.nodes].count("Add") == 2
    assert record.counters["merged_nodes"] == 0
