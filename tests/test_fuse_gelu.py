"""fuse-gelu: erf and tanh GELU decompositions -> Gelu / com.microsoft Gelu, FastGelu."""

from __future__ import annotations

import math

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import ir
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, PassContext, get_pass
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


class Builder:
    """Nodes the way torch.onnx names them: Constant nodes for the scalars."""

    def __init__(self):
        self.nodes, self.n = [], 0

    def op(self, op_type, *inputs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"/act/{op_type}_{self.n}"))
        return out

    def c(self, value):
        self.n += 1
        out = f"c{self.n}"
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.float32(value), "")))
        return out


def erf_gelu(b, x, order, scaling="div"):
    arg = b.op("Div", x, b.c(math.sqrt(2))) if scaling == "div" else b.op("Mul", x, b.c(1 / math.sqrt(2)))
    e = b.op("Add", b.op("Erf", arg), b.c(1.0))
    if order == "bert":  # (x * e) * 0.5, as torch exports nn.GELU()
        return b.op("Mul", b.op("Mul", x, e), b.c(0.5))
    if order == "half_first":
        return b.op("Mul", b.op("Mul", b.c(0.5), x), e)
    return b.op("Mul", x, b.op("Mul", e, b.c(0.5)))


def tanh_gelu(b, x, cube="pow", k=math.sqrt(2 / math.pi)):
    c = b.op("Pow", x, b.c(3.0)) if cube == "pow" else b.op("Mul", x, b.op("Mul", x, x))
    inner = b.op("Add", x, b.op("Mul", b.c(0.044715), c))
    t = b.op("Tanh", b.op("Mul", b.c(k), inner))
    return b.op("Mul", b.op("Mul", b.c(0.5), x), b.op("Add", b.c(1.0), t))


def model_of(build, opset=17, extra_output=None):
    b = Builder()
    x = b.op("Relu", "x")  # GELU of a computed value, as after a Linear
    y = build(b, x)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    outputs = [helper.make_tensor_value_info("y", F, [2, 3, 8])]
    if extra_output:
        b.nodes.append(helper.make_node("Identity", [extra_output(b)], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", F, [2, 3, 8]))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 8])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    return model


def fuse(model, passes="fuse-gelu"):
    art = infoptc.compile(model, passes=passes)
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("order", ["bert", "half_first", "half_with_e"])
@pytest.mark.parametrize("scaling", ["div", "mul"])
def test_erf_gelu_becomes_contrib_gelu_below_opset_20(order, scaling):
    model = model_of(lambda b, x: erf_gelu(b, x, order, scaling))
    out, counters = fuse(model)
    assert op_histogram(out) == {"Relu": 1, "com.microsoft::Gelu": 1, "Identity": 1}
    assert counters == {"fused": 1, "erf_gelu": 1, "tanh_gelu": 0}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_tanh_gelu_becomes_fast_gelu_below_opset_20(cube):
    model = model_of(lambda b, x: tanh_gelu(b, x, cube))
    out, counters = fuse(model)
    assert op_histogram(out) == {"Relu": 1, "com.microsoft::FastGelu": 1, "Identity": 1}
    assert counters["tanh_gelu"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_tanh_gelu_of_a_scalar_is_not_fast_gelu():
    # ONNX Runtime's FastGelu rejects a rank-0 input at run time (found by the random-graph fuzz).
    model = model_of(lambda b, x: tanh_gelu(b, x))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.ClearField("dim")
    out, counters = fuse(model)
    assert counters["tanh_gelu"] == 0 and "com.microsoft::FastGelu" not in op_histogram(out)
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_standard_gelu_at_opset_20():
    for build, attrs in ((lambda b, x: erf_gelu(b, x, "bert"), {}),
                         (lambda b, x: tanh_gelu(b, x), {"approximate": "tanh"})):
        model = model_of(build, opset=20)
        out, _ = fuse(model)
        assert op_histogram(out) == {"Relu": 1, "Gelu": 1, "Identity": 1}
        gelu = next(n for n in out.graph.node if n.op_type == "Gelu")
        assert {a.name: helper.get_attribute_value(a).decode() for a in gelu.attribute} == attrs
        check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_not_fused_with_a_wrong_constant_or_a_shared_intermediate():
    wrong = model_of(lambda b, x: tanh_gelu(b, x, k=0.8))
    shared = model_of(lambda b, x: erf_gelu(b, x, "bert"), extra_output=lambda b: "t4")  # the Erf output
    for model in (wrong, shared):
        out, counters = fuse(model)
        assert counters["fused"] == 0
        assert op_histogram(out) == op_histogram(model)


def test_no_gelu_op_for_the_target_or_opset():
    model = model_of(lambda b, x: erf_gelu(b, x, "bert"))
    out, counters = fuse(model, "fuse-gelu{form=standard}")  # standard Gelu needs opset 20
    assert counters["fused"] == 0 and counters["rejected"] == 1 and "Gelu" not in op_histogram(out)
    graph = ir.to_graph(ir.infer_shapes(model))  # a target without the contrib ops
    result = get_pass("fuse-gelu")().run(graph, PassContext(opset=17, target="tvm"))
    assert result.counters["fused"] == 0


def test_golden_models(golden):
    bert = onnx.load(golden("bert"))
    assert op_histogram(bert)["Erf"] == 2  # one GELU per encoder layer
    out, counters = fuse(bert)
    assert counters["erf_gelu"] == 2
    assert op_histogram(out)["com.microsoft::Gelu"] == 2 and "Erf" not in op_histogram(out)
    check_equivalent(bert, out, Contract.REASSOCIATING)
    gpt = onnx.load(golden("gpt"))
    assert op_histogram(gpt)["Tanh"] == 2
    out, counters = fuse(gpt)
    assert counters["tanh_gelu"] == 2
    assert op_histogram(out)["com.microsoft::FastGelu"] == 2 and "Tanh" not in op_histogram(out)
    check_equivalent(gpt, out, Contract.REASSOCIATING)
