"""dedup-initializers: identical initializers merge; near-identical ones never do."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infoptc
from infoptc.pass_manager import Contract, PassContext, PassManager, get_pass
from infoptc.verify import check_equivalent, run_onnx

F = TP.FLOAT


def make_model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vi(name, shape=(2, 3), dtype=F):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def optimize(model):
    artifact = infoptc.compile(model, passes="dedup-initializers")
    counters: Counter = Counter()
    for record in artifact.pass_records:
        counters.update(record.counters)
    return artifact.model, counters


def _sum_model(inits: dict, shape=(2, 3)):
    """y = x + sum of every initializer (each through its own Add)."""
    nodes, prev = [], "x"
    for i, name in enumerate(inits):
        nodes.append(helper.make_node("Add", [prev, name], [f"s{i}"]))
        prev = f"s{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return make_model(nodes, [vi("x", shape)], [vi("y", shape)], inits)


def test_identical_initializers_merge():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = _sum_model({"a": w, "b": w.copy(), "c": w.copy(), "d": w + 1})
    out, counters = optimize(m)
    assert sorted(t.name for t in out.graph.initializer) == ["a", "d"]
    assert counters["merged"] == 2 and counters["saved_bytes"] == 2 * w.nbytes
    assert get_pass("dedup-initializers").contract == Contract.EXACT
    check_equivalent(m, out, Contract.EXACT)


def test_same_bytes_other_dtype_shape_or_sign_of_zero_stay_apart():
    m = _sum_model({"z": np.zeros((2, 3), np.float32), "nz": -np.zeros((2, 3), np.float32),
                    "row": np.zeros((1, 3), np.float32), "col": np.zeros((3,), np.float32)})
    ints = make_model([helper.make_node("Add", ["x", "i"], ["s"]), helper.make_node("Cast", ["s"], ["c"], to=F),
                       helper.make_node("Add", ["c", "f"], ["y"])],
                      [vi("x", (3,), TP.INT32)], [vi("y", (3,))],
                      {"i": np.zeros(3, np.int32), "f": np.zeros(3, np.float32)})  # same bytes, other dtype
    for model in (m, ints):
        out, counters = optimize(model)
        assert counters["merged"] == 0
        assert len(out.graph.initializer) == len(model.graph.initializer)


def test_a_hash_collision_never_merges_different_tensors(monkeypatch):
    class Colliding:
        def __init__(self, *args, **kwargs):
            pass

        def digest(self):
            return b"same"

    monkeypatch.setattr(hashlib, "blake2b", Colliding)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = _sum_model({"a": w, "b": w + 1, "c": w.copy()})
    out, counters = optimize(m)
    assert sorted(t.name for t in out.graph.initializer) == ["a", "b"]
    assert counters["merged"] == 1
    check_equivalent(m, out, Contract.EXACT)


def test_initializers_that_are_graph_inputs_keep_their_identity():
    x = gs.Variable("x", np.float32, (3,))
    w = gs.Constant("w", np.ones(3, np.float32))
    c = gs.Constant("c", np.ones(3, np.float32))
    a, y = gs.Variable("a", np.float32, (3,)), gs.Variable("y", np.float32, (3,))
    graph = gs.Graph(nodes=[gs.Node("Add", inputs=[x, w], outputs=[a]), gs.Node("Add", inputs=[a, c], outputs=[y])],
                     inputs=[x, w], outputs=[y], opset=17)
    (record,) = PassManager("dedup-initializers").run(graph, PassContext())
    assert record.counters["merged"] == 0
    assert graph.nodes[0].inputs[1] is w and graph.nodes[1].inputs[1] is c


def test_subgraph_copy_of_an_outer_initializer_merges():
    w = np.array([0.5, -1.0, 2.0], np.float32)
    branch_init = numpy_helper.from_array(w.copy(), "w_branch")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w_branch"], ["t"])], "then", [], [vi("t", (3,))],
                               [branch_init])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", (3,))])
    m = make_model([helper.make_node("Mul", ["x", "w"], ["xw"]),
                    helper.make_node("ReduceSum", ["xw"], ["s"], keepdims=0),
                    helper.make_node("Greater", ["s", "zero"], ["c"]),
                    helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", (3,))], [vi("y", (3,))], {"w": w, "zero": np.float32(0)})
    out, counters = optimize(m)
    assert counters["merged"] == 1
    (if_node,) = [n for n in out.graph.node if n.op_type == "If"]
    (then_out,) = [a.g for a in if_node.attribute if a.name == "then_branch"]
    assert then_out.node[0].input[1] == "w"  # the branch reads the outer tensor now
    for x in (np.array([1, 1, 1], np.float32), np.array([-3, 0, 0], np.float32)):
        np.testing.assert_array_equal(run_onnx(m, {"x": x})["y"], run_onnx(out, {"x": x})["y"])
