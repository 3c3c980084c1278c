"""fuse-activation: Conv(+Add)/Gemm + activation -> com.microsoft FusedConv / FusedGemm (onnx target)."""

from __future__ import annotations

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
RNG = np.random.default_rng(2)


def conv_model(activation, residual=False, clip_bounds=(0.0, 6.0), shared=False):
    inits = [numpy_helper.from_array(RNG.standard_normal((3, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    src = "c"
    if residual:  # resnet's block end: Conv -> Add(identity) -> Relu
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"]))
        src = "s"
    if activation == "Clip":  # ReLU6 as exported: min and max as Constant inputs
        lo, hi = clip_bounds
        inputs = [src]
        for name, value in (("lo", lo), ("hi", hi)):
            if isinstance(value, str):
                inputs.append(value)
            else:
                nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.float32(value), "")))
                inputs.append(name)
        nodes.append(helper.make_node("Clip", inputs, ["y"]))
    else:
        attrs = {"alpha": 0.2} if activation == "LeakyRelu" else {}
        nodes.append(helper.make_node(activation, [src], ["y"], **attrs))
    inputs = [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])]
    if isinstance(clip_bounds[1], str):
        inputs.append(helper.make_tensor_value_info(clip_bounds[1], F, []))
    outputs = [helper.make_tensor_value_info("y", F, [1, 3, 8, 8])]
    if shared:
        outputs.append(helper.make_tensor_value_info("c", F, [1, 3, 8, 8]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def gemm_model(activation):
    inits = [numpy_helper.from_array(RNG.standard_normal((5, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(5).astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), helper.make_node(activation, ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["batch", 4])],
                              [helper.make_tensor_value_info("y", F, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


ALL = "fuse-activation{ort-fused=true}"


def fuse(model, passes="fuse-activation"):
    art = infoptc.compile(model, passes=passes)
    return art.model, art.pass_records[-1].counters


def attrs_of(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("activation, params", [("Relu", None), ("Sigmoid", None), ("LeakyRelu", [0.2]),
                                                ("Clip", [0.0, 6.0])])
def test_conv_activation_becomes_fused_conv_on_request(activation, params):
    model = conv_model(activation)
    out, counters = fuse(model)
    assert op_histogram(out) == op_histogram(model) and "conv_activation" not in counters  # ORT does it itself
    out, counters = fuse(model, ALL)
    assert op_histogram(out) == {"com.microsoft::FusedConv": 1} and counters["conv_activation"] == 1
    attrs = attrs_of(out, "FusedConv")
    assert attrs["activation"].decode() == activation and attrs["pads"] == [1, 1, 1, 1]
    if params:
        assert attrs["activation_params"] == pytest.approx(params)
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_conv_add_relu_uses_the_sum_input():
    model = conv_model("Relu", residual=True)
    out, counters = fuse(model)
    assert op_histogram(out) == {"com.microsoft::FusedConv": 1} and counters["conv_add_relu"] == 1
    assert list(out.graph.node[0].input) == ["x", "w", "b", "x"]
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)
    off, counters = fuse(model, "fuse-activation{with-sum=false}")
    assert op_histogram(off) == {"Conv": 1, "Add": 1, "Relu": 1}


@pytest.mark.parametrize("activation", ["Relu", "Tanh"])
def test_gemm_activation_becomes_fused_gemm_on_request(activation):
    model = gemm_model(activation)
    out, counters = fuse(model, ALL)
    assert op_histogram(out) == {"com.microsoft::FusedGemm": 1} and counters["gemm_activation"] == 1
    assert attrs_of(out, "FusedGemm")["transB"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_not_fused():
    for model in (conv_model("Clip", clip_bounds=(0.0, "hi_in")),  # bound computed at run time
                  conv_model("Relu", shared=True)):  # the Conv output is read elsewhere
        out, counters = fuse(model, ALL)
        assert counters["fused"] == 0 and op_histogram(out)["Conv"] == 1
    graph = ir.to_graph(ir.infer_shapes(conv_model("Relu")))  # a target without the contrib kernels
    result = get_pass("fuse-activation")(ort_fused=True).run(graph, PassContext(opset=17, target="tvm"))
    assert result.counters["fused"] == 0 and result.counters["rejected"] == 1


def test_golden_cnns(golden):
    resnet = onnx.load(golden("resnet"))
    out, counters = fuse(resnet, "fuse-conv-bn,fuse-activation")
    assert counters == {"fused": 6, "conv_add_relu": 6}  # the 6 residual block ends
    assert op_histogram(out)["com.microsoft::FusedConv"] == 6 and op_histogram(out)["Relu"] == 7
    check_equivalent(resnet, out, Contract.REASSOCIATING)
    out, counters = fuse(resnet, "fuse-conv-bn," + ALL)
    # and 7 Conv+Relu: the stem and the first conv of each block
    assert counters["conv_activation"] == 7 and counters["conv_add_relu"] == 6
    assert op_histogram(out)["com.microsoft::FusedConv"] == 13 and "Relu" not in op_histogram(out)
    check_equivalent(resnet, out, Contract.REASSOCIATING)
    mobilenet = onnx.load(golden("mobilenet"))
    out, counters = fuse(mobilenet, "fuse-conv-bn," + ALL)
    assert counters["conv_activation"] == op_histogram(mobilenet)["Clip"] == 15
    check_equivalent(mobilenet, out, Contract.REASSOCIATING)
