"""The pattern-rewrite engine (infoptc.pattern): matching, conditions, explain, the driver."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import ir
from infoptc import pattern as pt
from infoptc.analysis import op_histogram
from infoptc.pass_manager import PASS_REGISTRY, Contract, PassContext
from infoptc.pattern import Const, Rule, apply_rules, explain, find_matches, rewrite_pass
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def make(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def graph_of(model):
    return ir.to_graph(ir.infer_shapes(model))


def node(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def export(graph, model):
    graph.cleanup().toposort()
    out = ir.from_graph(graph, model)
    onnx.checker.check_model(out)
    return out


# -- a MatMul + Add -> Gemm rule, as in the module docstring


def matmul_add(op, x, w=Const(), b=Const()):
    return op.Add(op.MatMul(x, w, _bind="mm"), b)


def gemm(op, x, w, b):
    return op.Gemm(x, w, b)


def two_d(ctx, x):
    return ctx.rank(x) == 2 or "input is not 2-D"


GEMM = Rule("matmul_add", matmul_add, gemm, two_d)


def linear_model(bias_first=False, extra_use=False, mm_is_output=False):
    add_inputs = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", add_inputs, ["y"], name="add")]
    outputs = [vi("y", [3, 5])]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="relu"))
        outputs.append(vi("r", [3, 5]))
    if mm_is_output:
        outputs.append(vi("m", [3, 5]))
    rng = np.random.default_rng(0)
    return make(nodes, [vi("x", [3, 4])], outputs,
                [const("w", rng.standard_normal((4, 5))), const("b", rng.standard_normal(5))])


@pytest.mark.parametrize("bias_first", [False, True])
def test_commutative_add_matches_either_order(bias_first):
    model = linear_model(bias_first=bias_first)
    g = graph_of(model)
    stats = apply_rules(g, [GEMM])
    assert stats.applied["matmul_add"] == 1 and stats.converged
    out = export(g, model)
    assert op_histogram(out) == {"Gemm": 1}
    assert [o.name for o in out.graph.output] == ["y"]  # the replaced value keeps its name
    check_equivalent(model, out, Contract.REASSOCIATING)


def test_non_commutative_op_keeps_its_order():
    def sub(op, x, c=Const()):
        return op.Sub(x, c)

    rule = Rule("sub", sub, lambda op, x, c: op.Add(x, c))
    model = make([helper.make_node("Sub", ["c", "x"], ["y"], name="sub")], [vi("x", [2])], [vi("y", [2])],
                 [const("c", [1.0, 2.0])])
    g = graph_of(model)
    assert apply_rules(g, [rule]).total == 0
    assert "Sub#1 input 1: c must be a constant, 'x' is computed" in explain(rule, g, node(g, "sub"))


def test_one_use_condition_blocks_shared_intermediate():
    model = linear_model(extra_use=True)
    g = graph_of(model)
    assert apply_rules(g, [GEMM]).total == 0
    why = explain(GEMM, g, node(g, "add"))
    assert "intermediate 'm'" in why and "another consumer" in why and "Relu" in why


def test_intermediate_graph_output_blocks_fusion():
    model = linear_model(mm_is_output=True)
    g = graph_of(model)
    assert apply_rules(g, [GEMM]).total == 0
    assert "is a graph output" in explain(GEMM, g, node(g, "add"))


def test_explain_names_the_failing_pattern_node_and_input():
    model = linear_model()
    g = graph_of(model)
    assert "matches" in explain(GEMM, g, node(g, "add"))
    assert "Add#2 wants Add, found MatMul" in explain(GEMM, g, node(g, "mm"))

    def half(op, x):
        return op.Mul(x, 0.5)

    rule = Rule("half", half, lambda op, x: x)
    m2 = make([helper.make_node("Mul", ["x", "c"], ["y"], name="mul")], [vi("x", [2])], [vi("y", [2])],
              [const("c", 2.0)])
    g2 = graph_of(m2)
    why = explain(rule, g2, node(g2, "mul"))
    assert "Mul#1 input 1" in why and "wants the constant 0.5" in why and "2.0" in why


def test_explain_reports_the_check_reason():
    model = make([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                  helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                 [vi("x", [2, 3, 4])], [vi("y", [2, 3, 5])], [const("w", np.ones((4, 5))), const("b", np.ones(5))])
    g = graph_of(model)
    assert apply_rules(g, [GEMM]).rejected["matmul_add"] == 1
    assert "check: input is not 2-D" in explain(GEMM, g, node(g, "add"))


def test_const_variables_and_value_predicates():
    def scaled(op, x, s=Const(lambda v: v.size == 1 and float(v) > 0)):
        return op.Mul(x, s)

    rule = Rule("scaled", scaled, lambda op, x, s: op.Div(x, 1.0 / float(op.ctx.value(s))))
    positive = make([helper.make_node("Mul", ["x", "s"], ["y"], name="mul")], [vi("x", [2])], [vi("y", [2])],
                    [const("s", 4.0)])
    negative = make([helper.make_node("Mul", ["x", "s"], ["y"], name="mul")], [vi("x", [2])], [vi("y", [2])],
                    [const("s", -4.0)])
    computed = make([helper.make_node("Neg", ["z"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"], name="mul")],
                    [vi("x", [2]), vi("z", [])], [vi("y", [2])])
    g = graph_of(positive)
    assert apply_rules(g, [rule]).total == 1
    check_equivalent(positive, export(g, positive), Contract.REASSOCIATING)
    g = graph_of(negative)
    assert "fails the value condition of s" in explain(rule, g, node(g, "mul"))
    g = graph_of(computed)
    assert "s must be a constant" in explain(rule, g, node(g, "mul"))


def test_constant_nodes_count_as_constants():
    model = make([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(0.5), "")),
                  helper.make_node("Mul", ["x", "c"], ["y"], name="mul")], [vi("x", [2])], [vi("y", [2])])

    def half(op, x):
        return op.Mul(x, 0.5)

    g = graph_of(model)
    assert len(find_matches(g, Rule("half", half, lambda op, x: op.Identity(x)))) == 1


def test_repeated_variable_must_bind_one_tensor():
    def square(op, x):
        return op.Mul(x, x)

    rule = Rule("square", square, lambda op, x: op.Pow(x, 2.0))
    same = make([helper.make_node("Mul", ["x", "x"], ["y"], name="mul")], [vi("x", [2])], [vi("y", [2])])
    different = make([helper.make_node("Mul", ["x", "z"], ["y"], name="mul")], [vi("x", [2]), vi("z", [2])],
                     [vi("y", [2])])
    assert apply_rules(graph_of(same), [rule]).total == 1
    g = graph_of(different)
    assert apply_rules(g, [rule]).total == 0
    assert "x is already 'x', here it is 'z'" in explain(rule, g, node(g, "mul"))


def test_attribute_values_predicates_and_schema_defaults():
    def softmax_last(op, x):
        return op.Softmax(x, axis=-1)

    def softmax_any_last(op, x):
        return op.Softmax(x, axis=lambda a: a in (-1, 2))

    model_default = make([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [vi("x", [2, 3, 4])],
                         [vi("y", [2, 3, 4])], opset=13)
    model_axis2 = make([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=2)], [vi("x", [2, 3, 4])],
                       [vi("y", [2, 3, 4])], opset=13)
    model_old = make([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [vi("x", [2, 3, 4])],
                     [vi("y", [2, 3, 4])], opset=11)
    exact = Rule("last", softmax_last, lambda op, x: op.Softmax(x, axis=-1))
    loose = Rule("any", softmax_any_last, lambda op, x: op.Softmax(x, axis=-1))
    assert len(find_matches(graph_of(model_default), exact)) == 1  # absent axis -> default -1 at opset 13
    assert len(find_matches(graph_of(model_axis2), exact)) == 0
    assert len(find_matches(graph_of(model_axis2), loose)) == 1
    g = graph_of(model_old)  # opset 11: the default axis is 1
    assert len(find_matches(g, exact)) == 0
    assert "attribute axis=1" in explain(exact, g, node(g, "sm"))


def relu_chain(n):
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i}"], [f"r{i + 1}"], name=f"relu{i}") for i in range(n)]
    nodes.append(helper.make_node("Neg", [f"r{n}"], ["y"], name="neg"))
    return make(nodes, [vi("x", [4])], [vi("y", [4])])


def test_fixed_point_driver_reaches_the_fixed_point():
    def double_relu(op, x):
        return op.Relu(op.Relu(x))

    rule = Rule("double_relu", double_relu, lambda op, x: op.Relu(x))
    model = relu_chain(8)
    g = graph_of(model)
    stats = apply_rules(g, [rule])
    assert stats.converged and stats.iterations > 1
    assert stats.applied["double_relu"] == 7
    out = export(g, model)
    assert op_histogram(out) == {"Relu": 1, "Neg": 1}
    check_equivalent(model, out, Contract.EXACT)


def test_fixed_point_driver_stops_at_its_iteration_cap():
    # A rule whose replacement matches again never converges: the cap ends it.
    def relu(op, x):
        return op.Relu(x)

    rule = Rule("forever", relu, lambda op, x: op.Relu(x))
    model = relu_chain(1)
    g = graph_of(model)
    stats = apply_rules(g, [rule], max_iterations=3)
    assert not stats.converged and stats.iterations == 3 and stats.applied["forever"] == 3
    check_equivalent(model, export(g, model), Contract.EXACT)


def test_driver_tries_a_rule_only_at_nodes_of_its_root_op(monkeypatch):
    calls = []
    original = pt._Matcher.match

    def counting(self, node):
        calls.append(node.op)
        return original(self, node)

    monkeypatch.setattr(pt._Matcher, "match", counting)
    model = relu_chain(50)
    apply_rules(graph_of(model), [GEMM])
    assert calls == []  # no Add in the graph: nothing is tried
    apply_rules(graph_of(linear_model()), [GEMM])
    assert calls == ["Add"]


def test_multi_output_pattern_replaces_each_output():
    # (Relu(a + b), a + b) -> (Relu(s), s) with s = Sum(b, a): the shared sum keeps its readers.
    def relu_of_sum(op, a, b):
        total = op.Add(a, b)
        return op.Relu(total), total

    def rebuilt(op, a, b):
        total = op.Sum(b, a)
        return op.Relu(total), total

    rule = Rule("relu_of_sum", relu_of_sum, rebuilt)
    model = make([helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                  helper.make_node("Relu", ["s"], ["y"], name="relu"),
                  helper.make_node("Neg", ["s"], ["z"], name="neg")],
                 [vi("a", [3]), vi("b", [3])], [vi("y", [3]), vi("z", [3])])
    g = graph_of(model)
    assert apply_rules(g, [rule]).total == 1
    out = export(g, model)
    assert op_histogram(out) == {"Sum": 1, "Relu": 1, "Neg": 1}
    total = next(n for n in out.graph.node if n.op_type == "Sum")
    assert list(total.input) == ["b", "a"] and list(total.output) == ["s"]
    check_equivalent(model, out, Contract.EXACT)


def test_replacement_returning_an_existing_value_rewires_and_keeps_outputs():
    def double_neg(op, x):
        return op.Neg(op.Neg(x))

    rule = Rule("double_neg", double_neg, lambda op, x: x)
    inner = make([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n1"], name="n1"),
                  helper.make_node("Neg", ["n1"], ["n2"], name="n2"), helper.make_node("Sigmoid", ["n2"], ["y"])],
                 [vi("x", [3])], [vi("y", [3])])
    at_output = make([helper.make_node("Neg", ["x"], ["n1"], name="n1"), helper.make_node("Neg", ["n1"], ["y"], name="n2")],
                     [vi("x", [3])], [vi("y", [3])])
    g = graph_of(inner)
    apply_rules(g, [rule])
    assert op_histogram(export(g, inner)) == {"Relu": 1, "Sigmoid": 1}
    g = graph_of(at_output)
    apply_rules(g, [rule])
    out = export(g, at_output)
    assert op_histogram(out) == {"Identity": 1} and [o.name for o in out.graph.output] == ["y"]
    check_equivalent(at_output, out, Contract.EXACT)


def control_flow_model(shared_in_body: bool):
    """Outer MatMul -> Relu; an If whose branches read the MatMul (or the Relu) output."""
    read = "m" if shared_in_body else "y"
    branch = lambda tag: helper.make_graph(
        [helper.make_node("Neg", [read], [f"{tag}_out"], name=f"{tag}_neg")], tag, [], [vi(f"{tag}_out", [2, 2])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["y"], name="relu"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["z"], then_branch=branch("then"), else_branch=branch("else"))]
    return make(nodes, [vi("x", [2, 2])], [vi("z", [2, 2]), vi("y", [2, 2])],
                [const("w", np.eye(2) * 3), const("zero", 0.0)])


def relu_matmul(op, x, w):
    return op.Relu(op.MatMul(x, w))


REBUILD = Rule("relu_matmul", relu_matmul, lambda op, x, w: op.Relu(op.Gemm(x, w)))


def test_outer_scope_reader_of_an_intermediate_blocks_fusion():
    model = control_flow_model(shared_in_body=True)
    g = graph_of(model)
    assert apply_rules(g, [REBUILD]).total == 0
    assert "another consumer: Neg" in explain(REBUILD, g, node(g, "relu"))


def test_outer_scope_reader_of_the_result_keeps_its_reference():
    model = control_flow_model(shared_in_body=False)
    g = graph_of(model)
    assert apply_rules(g, [REBUILD]).total == 1
    out = export(g, model)
    assert op_histogram(out)["Gemm"] == 1
    check_equivalent(model, out, Contract.EXACT)


def test_body_patterns_never_pull_in_outer_nodes(golden):
    model = onnx.load(golden("control_flow"))
    g = graph_of(model)

    def add_of_relu(op, x, b):
        return op.Add(op.Relu(x), b)

    rule = Rule("add_of_relu", add_of_relu, lambda op, x, b: op.Add(op.Relu(x), b))
    assert apply_rules(g, [rule]).total == 0  # the If branch's Add reads the outer Relu
    body = next(n for n in g.nodes if n.op == "If").attrs["then_branch"]
    assert "not computed in this graph" in explain(rule, g, body.nodes[0])


def test_rules_apply_inside_subgraphs(golden):
    model = onnx.load(golden("control_flow"))

    def tanh_of_add(op, a, b):
        return op.Tanh(op.Add(a, b))

    rule = Rule("tanh_of_add", tanh_of_add, lambda op, a, b: op.Tanh(op.Sum(a, b)))
    g = graph_of(model)
    assert apply_rules(g, [rule]).applied["tanh_of_add"] == 1  # inside the Loop body
    check_equivalent(model, export(g, model), Contract.EXACT)


def test_rewrite_pass_registers_a_pass_with_counters_per_rule():
    cls = rewrite_pass("test-pattern-gemm", "MatMul + Add -> Gemm (test)", [GEMM], register=False)
    assert cls.name == "test-pattern-gemm" and cls.contract == Contract.REASSOCIATING
    assert "test-pattern-gemm" not in PASS_REGISTRY
    result = cls().run(graph_of(linear_model()), PassContext())
    assert result.changed and result.counters == {"fused": 1, "matmul_add": 1}
    registered = rewrite_pass("test-pattern-gemm-registered", "MatMul + Add -> Gemm (test)", [GEMM])
    try:
        art = infoptc.compile(linear_model(), passes="test-pattern-gemm-registered")
        assert art.pass_records[0].counters == {"fused": 1, "matmul_add": 1}
        assert op_histogram(art.model) == {"Gemm": 1}
    finally:
        PASS_REGISTRY.pop(registered.name)


def test_bad_patterns_are_refused_when_the_rule_is_made():
    with pytest.raises(TypeError, match="Const"):
        Rule("bad", lambda op, x=1: op.Relu(x), lambda op, x: x)
    with pytest.raises(TypeError, match="op builder"):
        Rule("bad", lambda op, x: x, lambda op, x: x)

    def dangling(op, x):
        op.Neg(x)
        return op.Relu(x)

    with pytest.raises(TypeError, match="not an input of the root"):
        Rule("bad", dangling, lambda op, x: x)


def test_shape_uses_of_intermediates_are_rewired():
    # Relu(Neg(x)) where a Shape reads Neg's output: the replacement re-points the Shape.
    def relu_neg(op, x):
        return op.Relu(op.Neg(x, _bind="negated"))

    def rebuilt(op, x, shape_uses):
        for shape in shape_uses.get("negated", []):
            op.replace_uses(shape.outputs[0], op.Shape(x))
        return op.Relu(op.Mul(x, -1.0))

    model = make([helper.make_node("Neg", ["x"], ["n"], name="neg"), helper.make_node("Relu", ["n"], ["y"], name="relu"),
                  helper.make_node("Shape", ["n"], ["s"], name="shape")],
                 [vi("x", [2, 3])], [vi("y", [2, 3]), vi("s", [2], TensorProto.INT64)])
    strict = Rule("strict", relu_neg, lambda op, x: op.Relu(op.Neg(x)))
    g = graph_of(model)
    assert apply_rules(g, [strict]).total == 0
    g = graph_of(model)
    assert apply_rules(g, [Rule("shapes", relu_neg, rebuilt, allow_shape_uses=True)]).total == 1
    out = export(g, model)
    shape = next(n for n in out.graph.node if n.op_type == "Shape")
    assert list(shape.input) == ["x"] and "Neg" not in op_histogram(out)
    check_equivalent(model, out, Contract.EXACT)


def test_the_plugin_example_of_the_docs_runs(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pattern_rewrite.md").read_text()
    code = re.search(r"`silu_plugin.py`.*?```python\n(.*?)```", doc, re.DOTALL).group(1)
    (tmp_path / "silu_plugin.py").write_text(code)
    model = make([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])],
                 [vi("x", [2, 8])], [vi("y", [2, 8])])
    try:
        art = infoptc.compile(model, passes="default<O1>,fuse-silu", load_plugins=[str(tmp_path / "silu_plugin.py")])
        assert op_histogram(art.model) == {"com.microsoft::QuickGelu": 1}
        assert art.pass_records[-1].counters == {"fused": 1, "silu": 1}
        check_equivalent(model, art.model, Contract.REASSOCIATING)
    finally:
        PASS_REGISTRY.pop("fuse-silu", None)
