"""fuse-pad: zero Pad of the spatial dims -> pads of the following Conv / AveragePool / MaxPool."""

from __future__ import annotations

import infoptc
import numpy as np
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
SPATIAL = [0, 0, 1, 2, 0, 0, 2, 1]  # N, C, H, W begins then ends: H +1/+2, W +2/+1


def pad_model(consumer, amounts=SPATIAL, fill=0.0, mode=None, relu=False, opset=17, **attrs):
    inits = [numpy_helper.from_array(np.array(amounts, np.int64), "pads"),
             numpy_helper.from_array(np.array(fill, np.float32), "fill")]
    nodes, src = [], "x"
    if relu:
        nodes.append(helper.make_node("Relu", ["x"], ["r"]))
        src = "r"
    nodes.append(helper.make_node("Pad", [src, "pads", "fill"], ["p"], **({"mode": mode} if mode else {})))
    inputs = ["p"]
    if consumer == "Conv":
        inits.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
        inputs.append("w")
    nodes.append(helper.make_node(consumer, inputs, ["y"], **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, ["n", "c", "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def fuse(model):
    art = infoptc.compile(model, passes="fuse-pad")
    return art.model, art.pass_records[0].counters


def attrs_of(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("consumer, fill, relu, attrs, rule", [
    ("Conv", 0.0, False, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, "pad_conv"),
    ("AveragePool", 0.0, False, {"kernel_shape": [3, 3], "count_include_pad": 1, "pads": [1, 0, 0, 0]}, "pad_avgpool"),
    ("AveragePool", 0.0, False, {"kernel_shape": [3, 3]}, "pad_avgpool"),  # no own pads: counting them is moot
    ("MaxPool", -np.inf, False, {"kernel_shape": [3, 3]}, "pad_maxpool"),
    ("MaxPool", 0.0, True, {"kernel_shape": [3, 3]}, "pad_maxpool"),  # zero pad of a Relu output
])
def test_pad_folds_into_the_consumer(consumer, fill, relu, attrs, rule):
    model = pad_model(consumer, fill=fill, relu=relu, **attrs)
    out, counters = fuse(model)
    assert "Pad" not in op_histogram(out) and counters[rule] == 1
    own = attrs.get("pads", [0, 0, 0, 0])
    assert attrs_of(out, consumer)["pads"] == [own[0] + 1, own[1] + 2, own[2] + 2, own[3] + 1]
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("case", ["reflect", "channel_pad", "nonzero_fill", "negative_pad", "exclusive_avgpool",
                                  "maxpool_zero_fill", "auto_pad", "pool_pads_reach_kernel"])
def test_not_folded(case):
    model = {
        "reflect": lambda: pad_model("Conv", mode="reflect", kernel_shape=[3, 3]),
        "channel_pad": lambda: pad_model("Conv", amounts=[0, 1, 0, 0, 0, 0, 0, 0], kernel_shape=[3, 3]),
        "nonzero_fill": lambda: pad_model("Conv", fill=1.0, kernel_shape=[3, 3]),
        "negative_pad": lambda: pad_model("Conv", amounts=[0, 0, -1, 0, 0, 0, 0, 0], kernel_shape=[3, 3]),
        "exclusive_avgpool": lambda: pad_model("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        "maxpool_zero_fill": lambda: pad_model("MaxPool", kernel_shape=[3, 3]),
        "auto_pad": lambda: pad_model("Conv", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        "pool_pads_reach_kernel": lambda: pad_model("AveragePool", kernel_shape=[2, 2], count_include_pad=1),
    }[case]()
    out, counters = fuse(model)
    assert op_histogram(out)["Pad"] == 1 and counters["fused"] == 0


def test_golden_models_have_no_pad(golden):
    import onnx

    for name in ("resnet", "mobilenet"):  # exporters put these pads on the Conv already
        model = onnx.load(golden(name))
        out, counters = fuse(model)
        assert "Pad" not in op_histogram(model) and counters["fused"] == 0
        assert op_histogram(out) == op_histogram(model)
