"""smooth-quant: activation outlier channels of LayerNorm -> MatMul folded into the weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from infoptc import ir
from infoptc.pass_manager import PassContext, PassManager
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
H = 32


def block(readers=2):
    rng = np.random.default_rng(0)
    gamma = np.ones(H, np.float32)
    gamma[[3, 17]] = 30.0  # two outlier channels, as trained transformers have
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1)]
    outs = []
    for i in range(readers):
        inits.append(numpy_helper.from_array((rng.standard_normal((H, 16)) * 0.1).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["ln", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", F, [1, 4, 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, H])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, H)).astype(np.float32)} for _ in range(n)]


def smooth(model, alpha=0.5):
    graph = ir.to_graph(model)
    records = PassManager(f"smooth-quant{{alpha={alpha}}}").run(graph, PassContext(options={"calibration": feeds(4, 0)}))
    return ir.from_graph(graph, model), records[0].counters


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_outputs_kept_and_outliers_flattened():
    model = block()
    out, counters = smooth(model)
    assert counters["smoothed"] == 1
    for f in feeds(3, 1):
        for a, b in zip(run(out, f), run(model, f)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # the LayerNorm's output, now the MatMuls' input: its channel peaks are far more even
    probe = lambda m: ort.InferenceSession(_with_ln_output(m).SerializeToString()).run(["ln"], feeds(1, 2)[0])[0]
    spread = lambda a: np.abs(a).max(axis=(0, 1)).max() / np.median(np.abs(a).max(axis=(0, 1)))
    assert spread(probe(out)) < spread(probe(model)) / 3


def _with_ln_output(model):
    m = type(model)()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("ln", F, [1, 4, H]))
    return m


def test_a_residual_reader_keeps_the_layernorm_and_gets_a_mul():
    model = block()
    model.graph.node.append(helper.make_node("Relu", ["ln"], ["r"], name="relu"))  # e.g. a residual
    model.graph.output.append(helper.make_tensor_value_info("r", F, [1, 4, H]))
    out, counters = smooth(model)
    assert counters["smoothed"] == 1
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Mul") == 1
    ln_scale = next(n for n in out.graph.node if n.op_type == "LayerNormalization").input[1]
    assert ln_scale == "g"  # the LayerNorm itself is untouched: the Relu reads it as before
    for f in feeds(3, 1):
        for a, b in zip(run(out, f), run(model, f)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
