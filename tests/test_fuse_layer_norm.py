"""fuse-layer-norm: decomposed LayerNorm over the last axis -> LayerNormalization."""

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
RNG = np.random.default_rng(11)
HIDDEN = 16


def layer_norm_model(opset=17, axis=-1, affine="scale_bias", dynamic_gamma=False, shared=False, divide="div"):
    """The torch exporter's decomposition (bert.py's layer_norm), on x = a + b."""
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1e-5), "eps"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, HIDDEN).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(HIDDEN).astype(np.float32), "beta")]

    def reduce_mean(src, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [src], [out], axes=[axis], keepdims=1)

    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([axis], np.int64), "axes"))
    nodes = [helper.make_node("Add", ["a", "b"], ["x"]), reduce_mean("x", "mean"),
             helper.make_node("Sub", ["x", "mean"], ["d"]), helper.make_node("Pow", ["d", "two"], ["sq"]),
             reduce_mean("sq", "var"), helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["std"])]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["d", "inv"], ["n"])]
    last = "n"
    if affine in ("scale_bias", "scale"):
        nodes.append(helper.make_node("Mul", ["n", "g_in" if dynamic_gamma else "gamma"], ["s"]))
        last = "s"
    if affine == "scale_bias":
        nodes.append(helper.make_node("Add", ["beta", "s"], ["y0"]))  # bias first, as some exporters do
        last = "y0"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    shape = [2, 5, HIDDEN]
    inputs = [helper.make_tensor_value_info("a", F, shape), helper.make_tensor_value_info("b", F, shape)]
    if dynamic_gamma:
        inputs.append(helper.make_tensor_value_info("g_in", F, [HIDDEN]))
    outputs = [helper.make_tensor_value_info("y", F, shape)]
    if shared:
        outputs.append(helper.make_tensor_value_info("d", F, shape))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def fuse(model):
    art = infoptc.compile(model, passes="fuse-layer-norm")
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("affine, divide", [("scale_bias", "div"), ("scale", "reciprocal"), ("none", "div")])
def test_decomposed_layer_norm_fuses(opset, affine, divide):
    model = layer_norm_model(opset=opset, affine=affine, divide=divide)
    out, counters = fuse(model)
    assert op_histogram(out) == {"Add": 1, "LayerNormalization": 1, "Identity": 1}
    assert counters == {"fused": 1, "layer_norm": 1}
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
    assert attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(1e-5)
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_positive_last_axis_fuses():
    out, counters = fuse(layer_norm_model(axis=2))
    assert counters["fused"] == 1 and op_histogram(out)["LayerNormalization"] == 1


@pytest.mark.parametrize("case", ["wrong_axis", "shared_intermediate", "dynamic_gamma", "old_opset"])
def test_not_fused(case):
    model = {
        "wrong_axis": lambda: layer_norm_model(axis=1),
        "shared_intermediate": lambda: layer_norm_model(shared=True),
        "dynamic_gamma": lambda: layer_norm_model(dynamic_gamma=True, affine="scale"),
        "old_opset": lambda: layer_norm_model(opset=16),
    }[case]()
    out, counters = fuse(model)
    if case == "dynamic_gamma":  # the normalization itself still fuses; the Mul by a runtime gamma stays
        assert op_histogram(out)["LayerNormalization"] == 1 and op_histogram(out)["Mul"] == 1
    else:
        assert "LayerNormalization" not in op_histogram(out) and counters["fused"] == 0


def test_golden_bert_layer_norms_all_fuse(golden):
    bert = onnx.load(golden("bert"))
    layer_norms = 2 * 2 + 1  # two per encoder layer and one after the embeddings
    assert op_histogram(bert)["ReduceMean"] == 2 * layer_norms
    out, counters = fuse(bert)
    assert counters["layer_norm"] == layer_norms
    hist = op_histogram(out)
    assert hist["LayerNormalization"] == layer_norms
    assert not {"ReduceMean", "Sqrt", "Pow"} & set(hist)
    check_equivalent(bert, out, Contract.REASSOCIATING)


@pytest.mark.parametrize("root", ["sqrt", "pow_half"])
def test_moments_variance_and_pow_half_root_fuse(root):
    """var = E[x^2] - E[x]^2 and std = Pow(var + eps, 0.5), as hand-written exports spell it."""
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(0.5), "half"),
             numpy_helper.from_array(np.float32(1e-5), "eps"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, HIDDEN).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(HIDDEN).astype(np.float32), "beta")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("Mul", ["x", "x"], ["xx"]),
             helper.make_node("ReduceMean", ["xx"], ["ex2"], axes=[-1], keepdims=1),
             helper.make_node("Mul", ["mean", "mean"], ["m2"]), helper.make_node("Sub", ["ex2", "m2"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["std"]) if root == "sqrt" else helper.make_node("Pow", ["ve", "half"], ["std"]),
             helper.make_node("Sub", ["x", "mean"], ["d"]), helper.make_node("Div", ["d", "std"], ["n"]),
             helper.make_node("Mul", ["n", "gamma"], ["s"]), helper.make_node("Add", ["s", "beta"], ["y"])]
    shape = [2, 5, HIDDEN]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, shape)],
                              [helper.make_tensor_value_info("y", F, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, counters = fuse(model)
    assert op_histogram(out) == {"LayerNormalization": 1} and counters == {"fused": 1, "layer_norm": 1}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)
