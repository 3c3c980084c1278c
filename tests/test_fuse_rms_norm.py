"""fuse-rms-norm: decomposed RMSNorm -> RMSNormalization (opset 23) or SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import ir
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, PassContext
from infoptc.passes.fuse import fuse_rms_norm
from infoptc.pattern import explain
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
HIDDEN = 16
SHAPE = [2, 5, HIDDEN]


def rms_model(opset=23, residual=False, form="reciprocal", axis=-1, dynamic_weight=False, sum_read=True):
    """LLaMA-style: h = a + b (residual); y = w * (h * 1/sqrt(mean(h^2) + eps)); h is also an
    output (``sum_read``: the residual stream goes on, as in every block but the last)."""
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1e-6), "eps"),
             numpy_helper.from_array(np.random.default_rng(5).uniform(0.5, 1.5, HIDDEN).astype(np.float32), "w")]
    nodes, x = [], "a"
    if residual:
        nodes.append(helper.make_node("Add", ["a", "b"], ["h"]))
        x = "h"
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([axis], np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["sq", "axes"], ["ms"])
    else:
        mean = helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[axis])
    nodes += [helper.make_node("Pow", [x, "two"], ["sq"]), mean, helper.make_node("Add", ["ms", "eps"], ["mse"]),
              helper.make_node("Sqrt", ["mse"], ["rms"])]
    if form == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", [x, "inv"], ["n"])]
    else:
        nodes.append(helper.make_node("Div", [x, "rms"], ["n"]))
    nodes.append(helper.make_node("Mul", ["w_in" if dynamic_weight else "w", "n"], ["y"]))
    inputs = [helper.make_tensor_value_info("a", F, SHAPE)]
    outputs = [helper.make_tensor_value_info("y", F, SHAPE)]
    if residual:
        inputs.append(helper.make_tensor_value_info("b", F, SHAPE))
    if residual and sum_read:
        outputs.append(helper.make_tensor_value_info("h", F, SHAPE))  # the residual stream goes on
    if dynamic_weight:
        inputs.append(helper.make_tensor_value_info("w_in", F, [HIDDEN]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    return model


def fuse(model, passes="fuse-rms-norm"):
    art = infoptc.compile(model, passes=passes)
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("form", ["reciprocal", "div"])
@pytest.mark.parametrize("residual", [False, True])
def test_standard_rms_normalization_at_opset_23(form, residual):
    model = rms_model(opset=23, residual=residual, form=form)
    out, counters = fuse(model)
    expected = {"RMSNormalization": 1, **({"Add": 1} if residual else {})}
    assert op_histogram(out) == expected and counters["rms_norm"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("sum_read", [True, False])
def test_residual_rms_norm_becomes_skip_simplified_layer_norm_below_opset_23(sum_read):
    model = rms_model(opset=17, residual=True, sum_read=sum_read)
    out, counters = fuse(model, passes="fuse-rms-norm{device=gpu}")
    assert op_histogram(out) == {"com.microsoft::SkipSimplifiedLayerNormalization": 1}
    assert counters["skip_rms_norm"] == 1
    node = out.graph.node[0]
    assert list(node.input) == ["a", "b", "w"] and node.output[0] == "y"
    assert [o.name for o in out.graph.output] == (["y", "h"] if sum_read else ["y"])
    if sum_read:  # the residual stream goes on through the fourth output
        assert node.output[3] == "h"
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_for_the_cpu_provider_the_residual_rms_norm_is_left_to_onnx_runtime_with_the_reason():
    """ONNX Runtime makes Add + SimplifiedLayerNormalization of the decomposed form at load,
    faster on its CPU provider than SkipSimplifiedLayerNormalization."""
    model = rms_model(opset=17, residual=True, form="div")
    out, counters = fuse(model)
    assert op_histogram(out)["ReduceMean"] == 1 and counters["fused"] == 0
    assert "SimplifiedLayerNormalization" in _as_ort_runs_it(out)  # as ONNX Runtime makes of it
    graph = ir.to_graph(ir.infer_shapes(model))
    root = next(n for n in graph.nodes if n.op == "Mul" and "y" in [t.name for t in n.outputs])
    why = explain(fuse_rms_norm.RULES[1], graph, root, PassContext(opset=17, target="onnx"))
    assert "CPU SkipSimplifiedLayerNormalization kernel is slower" in why


@pytest.mark.parametrize("case", ["no_residual_below_23", "wrong_axis", "dynamic_weight", "contrib_off"])
def test_not_fused(case):
    model = {
        "no_residual_below_23": lambda: rms_model(opset=17),
        "wrong_axis": lambda: rms_model(axis=1),
        "dynamic_weight": lambda: rms_model(dynamic_weight=True),
        "contrib_off": lambda: rms_model(opset=17, residual=True, sum_read=False),
    }[case]()
    passes = "fuse-rms-norm{contrib=false,device=gpu}" if case == "contrib_off" else "fuse-rms-norm{device=gpu}"
    art = infoptc.compile(model, passes=passes)
    hist = op_histogram(art.model)
    if case == "dynamic_weight":  # the normalization fuses; the Mul by a runtime weight stays
        assert hist["RMSNormalization"] == 1 and hist["Mul"] == 1
    else:
        assert hist["ReduceMean"] == 1 and art.pass_records[0].counters["fused"] == 0


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_layer_norms_of_the_golden_models_are_not_mistaken_for_rms_norms(golden, name):
    model = onnx.load(golden(name))
    out, counters = fuse(model)
    assert counters["fused"] == 0 and op_histogram(out) == op_histogram(model)


def _as_ort_runs_it(model) -> set[str]:
    """The op types ONNX Runtime's CPU provider runs after its own load-time fusions."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_below_opset_23_the_reciprocal_form_is_respelled_as_onnx_runtime_fuses_it():
    """x * Reciprocal(Sqrt(...)) (the dynamo exporter's spelling) is not fused by ONNX Runtime at
    load; Div(x, Sqrt(...)) is, into its vectorized SimplifiedLayerNormalization."""
    model = rms_model(opset=17, form="reciprocal")
    assert "SimplifiedLayerNormalization" not in _as_ort_runs_it(model)
    out, counters = fuse(model)
    assert counters["ort_form"] == 1 and "Reciprocal" not in op_histogram(out) and op_histogram(out)["Div"] == 1
    assert "SimplifiedLayerNormalization" in _as_ort_runs_it(out)
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("passes, form", [("fuse-rms-norm", "div"), ("fuse-rms-norm{device=gpu}", "reciprocal")])
def test_the_onnx_runtime_form_itself_and_other_devices_are_left(passes, form):
    out, counters = fuse(rms_model(opset=17, form=form), passes=passes)
    assert counters["fused"] == 0 and op_histogram(out)["ReduceMean"] == 1
