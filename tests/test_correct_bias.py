"""correct-bias: the mean output shift of int8 weights moved into the bias before quantizing."""

from __future__ import annotations

import infoptc
import numpy as np
import onnxruntime as ort
import pytest
from infoptc.errors import UsageError
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def conv(cin=16, cout=8, group=1, bias=True):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((cout, cin // group, 3, 3)) * 0.3).astype(np.float32)
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(np.zeros(cout, np.float32), "b")] if bias else [])
    graph = helper.make_graph([helper.make_node("Conv", inputs, ["y"], name="conv", pads=[1] * 4, group=group)], "g",
                              [helper.make_tensor_value_info("x", F, [1, cin, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, cout, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def samples(n, cin=16, seed=0):
    rng = np.random.default_rng(seed)
    # inputs with a large per-channel mean: the case where weight rounding shifts outputs most
    return [{"x": (rng.standard_normal((1, cin, 8, 8)) + 3.0).astype(np.float32)} for _ in range(n)]


def mean_error(model, quantized, data):
    ref = np.concatenate([ort.InferenceSession(model.SerializeToString()).run(None, f)[0] for f in data])
    out = np.concatenate([ort.InferenceSession(quantized.SerializeToString()).run(None, f)[0] for f in data])
    # the per-channel mean error, away from the zero-padded border the correction does not model
    return np.abs((out - ref)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3)))


@pytest.mark.parametrize("group, bias", [(1, True), (1, False), (4, True), (16, True)])
def test_mean_error_shrinks(group, bias):
    cout = 16 if group == 16 else 8
    model = conv(cout=cout, group=group, bias=bias)
    cal, ev = samples(8), samples(8, seed=1)
    plain = infoptc.compile(model, quantize="int8", calibration=cal, quantize_options={"isa": "avx2", "speed-check": False}).model
    fixed = infoptc.compile(model, quantize="int8", calibration=cal, quantize_options={"isa": "avx2", "speed-check": False},
                            correct_bias=True).model
    before, after = mean_error(model, plain, ev), mean_error(model, fixed, ev)
    assert after.mean() < 0.5 * before.mean(), (before, after)


def test_needs_calibration_and_static_int8():
    with pytest.raises(UsageError, match="correct-bias needs calibration"):
        infoptc.compile(conv(), passes="correct-bias")
    with pytest.raises(UsageError, match="needs the static int8 quantizer"):
        infoptc.compile(conv(), quantize="int8-dynamic", correct_bias=True)
