"""fold-constants: tiny before-graphs, the op histogram after, and numerical equivalence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infoptc
import infoptc.cli
from infoptc.analysis import op_histogram
from infoptc.errors import UsageError
from infoptc.pass_manager import Contract, PassContext, PassManager, get_pass
from infoptc.verify import check_equivalent, run_onnx

F = TP.FLOAT


def make_model(nodes, inputs, outputs, inits=None, opset=17):
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def const(name, value, dtype=np.float32):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def vi(name, dtype=F, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def optimize(model, passes="fold-constants", **kwargs):
    artifact = infoptc.compile(model, passes=passes, **kwargs)
    counters: Counter = Counter()
    for record in artifact.pass_records:
        if record.name == "fold-constants":
            counters.update(record.counters)
    return artifact.model, counters


def test_constant_arithmetic_folds_into_one_initializer():
    m = make_model(
        [const("a", [1.5, 2.0, -3.0]), const("b", 3.0),
         helper.make_node("Mul", ["a", "b"], ["ab"]),
         helper.make_node("Sqrt", ["ab"], ["r"]),  # sqrt of a negative: NaN must fold as NaN
         helper.make_node("Add", ["x", "r"], ["y"])],
        [vi("x", shape=[3])], [vi("y", shape=[3])])
    out, counters = optimize(m)
    assert op_histogram(out) == {"Add": 1}
    assert counters["constant_nodes"] == 2 and counters["folded"] == 2
    check_equivalent(m, out, get_pass("fold-constants").contract)


def test_shape_of_static_tensor_and_shape_chain_fold():
    m = make_model(
        [helper.make_node("Shape", ["x"], ["s"]),
         const("i", 0, np.int64),
         helper.make_node("Gather", ["s", "i"], ["n"], axis=0),
         const("ax", [0], np.int64),
         helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
         const("rest", [-1], np.int64),
         helper.make_node("Concat", ["n1", "rest"], ["shape"], axis=0),
         helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", shape=[2, 3, 4])], [vi("y", shape=[2, 12])])
    out, counters = optimize(m)
    assert op_histogram(out) == {"Reshape": 1}
    assert counters["folded"] == 4 and counters["constant_nodes"] == 3
    shape_init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert [list(v) for v in shape_init.values()] == [[2, -1]]
    check_equivalent(m, out, Contract.EXACT)


def _constant_of_shape_model(shape):
    return make_model(
        [helper.make_node("ConstantOfShape", ["dims"], ["big"],
                          value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Add", ["x", "big"], ["y"])],
        [vi("x", shape=list(shape))], [vi("y", shape=list(shape))],
        inits={"dims": np.array(shape, np.int64)})


def test_size_limit_skips_blow_up_with_a_counter():
    m = _constant_of_shape_model((128, 256))  # 128 KiB of float32
    out, counters = optimize(m, passes="fold-constants{size-limit=64KB}")
    assert counters["skipped_too_large"] == 1 and counters["folded"] == 0
    assert op_histogram(out) == {"ConstantOfShape": 1, "Add": 1}
    out, counters = optimize(m, passes="fold-constants{size-limit=1MB}")
    assert counters["folded"] == 1
    assert op_histogram(out) == {"Add": 1}
    check_equivalent(m, out, Contract.REASSOCIATING)


def test_huge_constant_of_shape_is_predicted_not_evaluated():
    # 4e10 floats: evaluating would exhaust memory; the size must be predicted first.
    m = make_model(
        [helper.make_node("ConstantOfShape", ["dims"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        [], [vi("y", shape=[])], inits={"dims": np.array([200_000, 200_000], np.int64)})
    out, counters = optimize(m)
    assert counters["skipped_too_large"] == 1
    assert "ConstantOfShape" in op_histogram(out)


def test_large_output_allowed_when_its_input_dies_with_it():
    w = np.arange(2 * 300_000, dtype=np.float32).reshape(2, 300_000)  # 2.4 MB, above the 1 MB limit
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    m = make_model(nodes, [vi("x", shape=[1, 300_000])], [vi("y", shape=[1, 2])], inits={"w": w})
    out, counters = optimize(m)
    assert counters["folded"] == 1 and op_histogram(out) == {"MatMul": 1}
    # If the weight is also read elsewhere, folding would store it twice: skipped when the
    # result is not a weight either (here it is one, so only a weight-size-limit stops it).
    shared = make_model(nodes + [helper.make_node("ReduceSum", ["w"], ["z"], keepdims=0)],
                        [vi("x", shape=[1, 300_000])], [vi("y", shape=[1, 2]), vi("z", shape=[])], inits={"w": w})
    out, counters = optimize(shared, passes="fold-constants{weight-size-limit=1MB}")
    assert counters["skipped_too_large"] == 1 and op_histogram(out)["Transpose"] == 1
    out, counters = optimize(shared)
    assert "Transpose" not in op_histogram(out)
    check_equivalent(shared, out, Contract.REASSOCIATING)


def _splat_weight_model(consumer: str) -> onnx.ModelProto:
    """A 2 MiB ConstantOfShape (the ONNX light model-zoo's way of storing weights), reshaped and
    used as a MatMul weight, or added to the activations (a mask-like broadcast)."""
    k, n = 1024, 512
    value = numpy_helper.from_array(np.array([0.02], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["dims"], ["w_flat"], value=value),
             helper.make_node("Reshape", ["w_flat", "wshape"], ["w"])]
    if consumer == "weight":
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
        shapes = ([1, k], [1, n])
    else:
        nodes.append(helper.make_node("Add", ["x", "w"], ["y"]))
        shapes = ([k, n], [k, n])
    return make_model(nodes, [vi("x", shape=shapes[0])], [vi("y", shape=shapes[1])],
                      inits={"dims": np.array([k * n], np.int64), "wshape": np.array([k, n], np.int64)})


def test_weights_fold_above_the_size_limit_but_activations_do_not():
    weight = _splat_weight_model("weight")
    out, counters = optimize(weight, passes="fold-constants,dce")
    assert op_histogram(out) == {"MatMul": 1} and counters["skipped_too_large"] == 0
    check_equivalent(weight, out, Contract.REASSOCIATING)
    # The same 2 MiB broadcast into the activations is a blow-up, not a weight: kept as an op.
    added = _splat_weight_model("activation")
    out, counters = optimize(added, passes="fold-constants,dce")
    assert op_histogram(out) == {"ConstantOfShape": 1, "Reshape": 1, "Add": 1}
    assert counters["skipped_too_large"] == 1
    # weight-size-limit caps weights too; -Os keeps both small.
    out, _ = optimize(weight, passes="fold-constants{weight-size-limit=1MB},dce")
    assert "ConstantOfShape" in op_histogram(out)
    out, _ = optimize(weight, opt_level="s", passes=None)
    assert "ConstantOfShape" in op_histogram(out)


def _graph_with_input_initializer():
    x = gs.Variable("x", np.float32, (3,))
    w = gs.Constant("w", np.array([1.0, 2.0, 3.0], np.float32))
    nw, y = gs.Variable("nw", np.float32, (3,)), gs.Variable("y", np.float32, (3,))
    nodes = [gs.Node("Neg", inputs=[w], outputs=[nw]), gs.Node("Add", inputs=[x, nw], outputs=[y])]
    return gs.Graph(nodes=nodes, inputs=[x, w], outputs=[y], opset=17)


def test_initializers_that_are_graph_inputs_are_not_folded():
    graph = _graph_with_input_initializer()
    (record,) = PassManager("fold-constants").run(graph, PassContext())
    assert [n.op for n in graph.nodes] == ["Neg", "Add"]
    assert record.counters["skipped_input_initializers"] == 1
    graph = _graph_with_input_initializer()
    (record,) = PassManager("fold-constants{fold-input-initializers=true}").run(graph, PassContext())
    assert [n.op for n in graph.nodes] == ["Add"]
    assert [t.name for t in graph.inputs] == ["x"]
    assert record.counters["released_input_initializers"] == 1 and record.counters["folded"] == 1


def test_freeze_initializers_lets_every_pass_treat_them_as_constants(tmp_path):
    x, w = vi("x", shape=[3]), vi("w", shape=[3])
    m = make_model([helper.make_node("Neg", ["w"], ["nw"]), helper.make_node("Add", ["x", "nw"], ["y"])],
                   [x, w], [vi("y", shape=[3])], inits={"w": np.array([1.0, 2.0, 3.0], np.float32)})
    out, _ = optimize(m, opt_level=2, passes=None)
    assert [i.name for i in out.graph.input] == ["x", "w"] and op_histogram(out) == {"Neg": 1, "Add": 1}
    out, _ = optimize(m, opt_level=2, passes=None, freeze_initializers=True)
    assert [i.name for i in out.graph.input] == ["x"] and op_histogram(out) == {"Add": 1}
    feeds = {"x": np.array([1.0, 1.0, 1.0], np.float32)}
    np.testing.assert_array_equal(run_onnx(out, feeds)["y"], np.array([0.0, -1.0, -2.0], np.float32))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    assert infoptc.cli.main([str(path), "-O2", "--freeze-initializers", "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert [i.name for i in onnx.load(tmp_path / "o.onnx").graph.input] == ["x"]


def test_nondeterministic_and_foreign_ops_are_left_alone():
    shape = gs.Constant("shape", np.array([2], np.int64))
    r = gs.Variable("r", np.float32, (2,))
    c = gs.Variable("c", np.float32, (2,))
    out = gs.Variable("out", np.float32, (2,))
    nodes = [gs.Node("RandomNormal", attrs={"shape": [2]}, outputs=[r]),
             gs.Node("MyOp", domain="com.example", inputs=[shape], outputs=[c]),
             gs.Node("Add", inputs=[r, c], outputs=[out])]
    graph = gs.Graph(nodes=nodes, inputs=[], outputs=[out], opset=17)
    PassManager("fold-constants").run(graph, PassContext())
    assert sorted(n.op for n in graph.nodes) == ["Add", "MyOp", "RandomNormal"]


def test_folded_graph_output_keeps_its_name():
    m = make_model([const("a", [1.0, 2.0]), helper.make_node("Exp", ["a"], ["y"]),
                    helper.make_node("Relu", ["x"], ["z"])],
                   [vi("x", shape=[2])], [vi("y", shape=[2]), vi("z", shape=[2])])
    out, counters = optimize(m)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert counters["folded"] == 1 and counters["constant_nodes"] == 1
    assert op_histogram(out) == {"Constant": 1, "Relu": 1}
    check_equivalent(m, out, Contract.REASSOCIATING)


def test_outer_scope_constant_used_by_if_branches():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["t"])], "then", [], [vi("t", shape=[2])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "c"], ["e"])], "else", [], [vi("e", shape=[2])])
    m = make_model(
        [const("a", [1.0, 4.0]), const("b", 2.0),
         helper.make_node("Mul", ["a", "b"], ["c"]),
         helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
         const("zero", 0.0),
         helper.make_node("Greater", ["sum", "zero"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("x", shape=[2])], [vi("y", shape=[2])])
    out, counters = optimize(m)
    assert op_histogram(out, subgraphs=False) == {"ReduceSum": 1, "Greater": 1, "If": 1}
    assert counters["folded"] == 1
    for sign in (1.0, -1.0):  # both branches
        feeds = {"x": np.array([sign, 2 * sign], np.float32)}
        np.testing.assert_array_equal(run_onnx(m, feeds)["y"], run_onnx(out, feeds)["y"])


def test_exact_only_folds_integers_and_data_movement_but_not_fp_math():
    m = make_model(
        [const("i", [1, 2], np.int64), const("j", [3, 4], np.int64),
         helper.make_node("Add", ["i", "j"], ["ij"]),
         helper.make_node("Cast", ["ij"], ["ijf"], to=F),
         const("f", [0.1, 0.2]), helper.make_node("Exp", ["f"], ["ef"]),
         const("g", [[1.0], [2.0]]), helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),
         helper.make_node("Reshape", ["gt", "two"], ["g2"]),
         helper.make_node("Sum", ["x", "ijf", "ef", "g2"], ["y"])],
        [vi("x", shape=[2])], [vi("y", shape=[2])], inits={"two": np.array([2], np.int64)})
    p = get_pass("fold-constants")(exact_only=True)
    assert p.contract == Contract.EXACT
    out, counters = optimize(m, passes="fold-constants{exact-only=true}")
    # Add of ints, Transpose and Reshape fold; the int->float Cast and Exp stay.
    assert op_histogram(out) == {"Cast": 1, "Exp": 1, "Sum": 1}
    assert counters["folded"] == 3
    check_equivalent(m, out, Contract.EXACT)
    out, _ = optimize(m)
    assert op_histogram(out) == {"Sum": 1}
    check_equivalent(m, out, Contract.REASSOCIATING)


def test_unevaluable_node_is_left_with_a_counter():
    # A Reshape of a constant to a shape that does not fit: the evaluator raises; the node stays.
    m = make_model([helper.make_node("Reshape", ["a", "s"], ["r"]),
                    helper.make_node("Identity", ["r"], ["y"])],
                   [], [vi("y")], inits={"a": np.zeros(6, np.float32), "s": np.array([4, 2], np.int64)})
    graph = gs.import_onnx(m)
    (record,) = PassManager("fold-constants").run(graph, PassContext())
    assert record.counters["skipped_unevaluable"] == 1
    assert [n.op for n in graph.nodes] == ["Reshape", "Identity"]


def test_size_limit_option_parses_sizes():
    assert PassManager("fold-constants{size-limit=4MB}").pipeline[0].opts["size-limit"] == 4_000_000
    assert PassManager("fold-constants{size-limit=2KiB}").pipeline[0].opts["size-limit"] == 2048
    with pytest.raises(UsageError):
        PassManager("fold-constants{size-limit=big}")


def test_sequences_of_constants_are_not_folded_into_tensors():
    """A constant initializer can only hold a tensor (found by the conformance sweep: test_if_seq)."""
    import numpy as np
    import onnx
    from onnx import helper as h
    from onnx import numpy_helper as nh

    import infoptc

    c = nh.from_array(np.ones(2, np.float32), "c")
    seq_out = h.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, [2])
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"]), h.make_node("SequenceConstruct", ["c", "c"], ["s"])],
                         "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2]), seq_out], [c])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    out = infoptc.optimize(m, opt_level=3, verify_each=True)
    assert "SequenceConstruct" in {n.op_type for n in out.graph.node}
    assert out.graph.output[1].type.WhichOneof("value") == "sequence_type"
