"""quantize-int8-dynamic: MatMul/Gemm weights to int8 behind ONNX Runtime's DynamicQuantizeMatMul."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from infoptc.errors import UsageError
from infoptc.passes.quantize.fusion_check import fusion_report
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def mlp(k=64, n=96, bias=True, small=False):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
    else:
        nodes[0].output[0] = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 5, k])],
                              [helper.make_tensor_value_info("y", F, [2, 5, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def dynamic(model, **options):
    options.setdefault("speed-check", False)  # the mechanics; the host timing has its own test
    return infoptc.compile(model, opt_level=2, quantize="int8-dynamic", quantize_options=options).model


def test_matmul_and_bias_become_one_kernel():
    model = mlp()
    q = dynamic(model)
    assert [n.op_type for n in q.graph.node] == ["DynamicQuantizeMatMul"]
    assert len(q.graph.node[0].input) == 5  # x, weight, scale, zero point, bias
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    (ref,), (out,) = run(model, {"x": x}), run(q, {"x": x})
    # error bound of one int8 product: rounding of x (range / 255 / 2 per element) and w (s_w / 2)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    s_x = (x.max() - min(x.min(), 0)) / 255
    s_w = np.abs(w).max(axis=0) / 127
    bound = np.abs(w).sum(axis=0) * s_x / 2 + np.abs(x).max() * 64 * s_w / 2 + 1e-5
    assert (np.abs(out - ref).max(axis=(0, 1)) <= bound).all()
    assert fusion_report(q)["intended"] == 1 and fusion_report(q)["left_fp32"] == []


def test_small_weights_stay_fp32():
    q = dynamic(mlp(k=8, n=8))
    assert [n.op_type for n in q.graph.node] == ["MatMul", "Add"]
    q = dynamic(mlp(k=8, n=8), **{"min-weight-elements": 16})
    assert [n.op_type for n in q.graph.node] == ["DynamicQuantizeMatMul"]


def test_golden_bert_keeps_its_meaning(golden):
    rng = np.random.default_rng(0)
    model = onnx.load(golden("bert"))
    q = infoptc.compile(model, opt_level=3, quantize="int8-dynamic", quantize_options={"speed-check": False}).model
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DynamicQuantizeMatMul") >= 8
    assert "QuantizeLinear" not in ops
    feed = {"input_ids": rng.integers(0, 100, (1, 16), dtype=np.int64), "attention_mask": np.ones((1, 16), np.int64)}
    feed = {k: v for k, v in feed.items() if k in {i.name for i in model.graph.input}}
    (ref,), (out,) = run(model, feed)[:1], run(q, feed)[:1]
    cos = float(np.sum(ref * out) / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert cos > 0.999
    assert q.ByteSize() < 0.45 * model.ByteSize()


def test_refuses_a_quantized_model_and_is_deterministic():
    once = dynamic(mlp())
    with pytest.raises(UsageError, match="already quantized"):
        dynamic(once)
    assert dynamic(mlp()).SerializeToString() == dynamic(mlp()).SerializeToString()


@pytest.mark.parametrize("int8_faster", [False, True])
def test_speed_check_decides_what_comes_out(monkeypatch, caplog, int8_faster):
    import logging

    from infoptc.passes.quantize import speed

    def compare(fp32, candidates, feed):
        assert set(feed) == {"x"} and feed["x"].shape == (2, 5, 64)
        return speed.Timing(1.0, {"int8": 0.5 if int8_faster else 2.0}, "int8" if int8_faster else None)

    monkeypatch.setattr(speed, "compare", compare)
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="infoptc"):
        art = infoptc.compile(model, opt_level=2, quantize="int8-dynamic")
    ops = [n.op_type for n in art.model.graph.node]
    if int8_faster:
        assert ops == ["DynamicQuantizeMatMul"]
    else:
        assert ops == ["MatMul", "Add"] and "not faster than fp32" in caplog.text
        x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
        np.testing.assert_array_equal(run(art.model, {"x": x})[0], run(model, {"x": x})[0])


def test_dynamic_is_for_the_onnx_target_only():
    with pytest.raises(UsageError, match="int8-dynamic .* --target onnx"):
        infoptc.compile(mlp(), quantize="int8-dynamic", target="llvm")
