"""equalize-cross-layer: Conv -> [Relu] -> Conv weight ranges balanced, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from infoptc import ir
from infoptc.pass_manager import PassManager
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def chain(between="Relu", group2=1, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * np.logspace(-2, 1, 8).reshape(8, 1, 1, 1).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 8 // group2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)]
    mid = "c1"
    if between == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["r"], name="relu"))
        mid = "r"
    elif between == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["r"], name="clip"))
        mid = "r"
    nodes.append(helper.make_node("Conv", [mid, "w2"], ["y"], name="conv2", pads=[1] * 4, group=group2))
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                         (np.float32(0), "lo"), (np.float32(6), "hi"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def equalize(model):
    graph = ir.to_graph(model)
    records = PassManager("equalize-cross-layer").run(graph)
    return ir.from_graph(graph, model), records[0].counters


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_ranges_balanced_and_outputs_kept():
    for group2 in (1, 8):  # a full conv and a depthwise one as the second layer
        model = chain(group2=group2)
        out, counters = equalize(model)
        assert counters["pairs"] == 1
        w = weights(out)
        w1 = next(v for k, v in w.items() if k.startswith("w1"))
        w2 = next(v for k, v in w.items() if k.startswith("w2"))
        r1 = np.abs(w1).reshape(8, -1).max(1)
        r2 = np.abs(w2).reshape(8, -1).max(1) if group2 > 1 else np.abs(w2).transpose(1, 0, 2, 3).reshape(8, -1).max(1)
        np.testing.assert_allclose(r1, r2, rtol=1e-4)
        before = np.abs(weights(model)["w1"]).reshape(8, -1).max(1)
        assert before.max() / before.min() > 50 and r1.max() / r1.min() < before.max() / before.min() / 4
        x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(run(out, x), run(model, x), rtol=1e-4, atol=1e-5)


def test_not_through_clip_or_to_a_second_reader():
    assert equalize(chain(between="Clip"))[1]["pairs"] == 0
    model = chain()
    model.graph.output.append(helper.make_tensor_value_info("r", F, [1, 8, 8, 8]))  # Relu output also read
    assert equalize(model)[1]["pairs"] == 0


def test_golden_resnet_pairs_inside_blocks(golden):
    model = onnx.load(golden("resnet"))
    graph = ir.to_graph(model)
    records = PassManager("fixpoint(fuse-conv-bn),equalize-cross-layer").run(graph)
    assert records[-1].counters["pairs"] >= 6  # conv1 -> relu -> conv2 of each basic block
    out = ir.from_graph(graph, model)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(ort.InferenceSession(out.SerializeToString()).run(None, {"input": x})[0], ref,
                               rtol=1e-4, atol=1e-4)
