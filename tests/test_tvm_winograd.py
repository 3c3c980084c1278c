"""Winograd F(2x2, 3x3) convolutions on the llvm target (backends/tvm/winograd.py).

Numerical checks against ONNX Runtime on the original model with the TVM tests' fp32 tolerance
(atol = rtol = 1e-4, see test_tvm_backend.py): the transforms multiply by 0, +-1 and +-1/2 only,
so the results differ from a direct conv by rounding (~1e-7 relative on ResNet's convs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

import infoptc
from _tvm import kernels_by_name, lowered
from infoptc.verify import OrtRunner, Tolerance, compare_outputs, random_inputs

TOL = Tolerance(atol=1e-4, rtol=1e-4)


def _conv_model(batch, channels, features, height, width, *, stride=1, pads=(1, 1, 1, 1), kernel=3, residual=False):
    rng = np.random.default_rng(channels * 7 + features * 3 + height)
    weight = (rng.standard_normal((features, channels, kernel, kernel)) / np.sqrt(9 * channels)).astype(np.float32)
    bias = rng.standard_normal(features).astype(np.float32)
    out_h = (height + pads[0] + pads[2] - kernel) // stride + 1
    out_w = (width + pads[1] + pads[3] - kernel) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=list(pads)),
             helper.make_node("Relu", ["c"], ["r"])]
    out = "r"
    if residual and (features, out_h, out_w) == (channels, height, width):
        nodes.append(helper.make_node("Add", ["r", "x"], ["y"]))
        out = "y"
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, height, width])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, features, out_h, out_w])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check_against_ort(model, tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    feeds = random_inputs(model)
    artifact = infoptc.compile(path, target="llvm")
    diffs = compare_outputs(OrtRunner(model).run(feeds), artifact.run(feeds), tolerances={"y": TOL, "r": TOL})
    assert all(d.ok for d in diffs), [d.describe() for d in diffs if not d.ok]
    return artifact


def _calls(mod) -> list[str]:
    """The kernels ``main`` calls, once per call."""
    import re

    return re.findall(r"R\.call_tir\((\w+),", mod["main"].script())


@pytest.mark.parametrize("shape,features,stride,pads,expected", [
    ((1, 32, 14, 14), 32, 1, (1, 1, 1, 1), True),
    ((2, 64, 8, 6), 64, 1, (1, 1, 1, 1), True),
    ((1, 16, 56, 56), 16, 1, (1, 1, 1, 1), True),    # ResNet's layer1: one vector of channels
    ((1, 16, 14, 14), 8, 1, (1, 1, 1, 1), True),     # 8 output channels: a part-vector
    ((1, 32, 14, 14), 32, 2, (1, 1, 1, 1), False),   # strided
    ((1, 32, 13, 14), 32, 1, (1, 1, 1, 1), False),   # odd height
    ((1, 8, 14, 14), 8, 1, (1, 1, 1, 1), False),     # fewer input channels than a 16-lane vector
    ((1, 16, 14, 14), 4, 1, (1, 1, 1, 1), False),    # fewer output channels than MIN_CHANNELS
    ((1, 32, 14, 14), 32, 1, (0, 0, 0, 0), False),   # no padding
])
def test_which_convs_use_winograd(shape, features, stride, pads, expected):
    batch, channels, height, width = shape
    kernels = kernels_by_name(lowered(_conv_model(batch, channels, features, height, width, stride=stride, pads=pads)))
    used = [name for name in kernels if "winograd_conv2d" in name]
    assert bool(used) == expected, sorted(kernels)
    if expected:  # bias and ReLU fused into the one kernel; every kernel scheduled
        assert len(used) == 1 and "relu" in used[0] and not [n for n in kernels if "conv2d" in n and n not in used]
        for name, func in kernels.items():
            assert func.attrs.get("tirx.is_scheduled"), name
            if "transpose" not in name:  # the graph's NHWC -> NCHW output: a small transpose
                assert "T.parallel" in func.script() and "T.vectorized" in func.script(), name


def test_row_tile_is_the_row_a_divisor_or_the_widest_with_a_tail():
    from infoptc.backends.tvm.winograd import ROW_TILE_MAX, row_tile

    assert [row_tile(b) for b in (1, 3, 7, 8)] == [1, 3, 7, 8]  # the whole row
    assert [row_tile(b) for b in (28, 12, 10, 16)] == [7, 6, 5, 8]  # widest divisor from 4 up
    assert [row_tile(b) for b in (13, 11, 17)] == [ROW_TILE_MAX] * 3  # a shorter last tile


def test_weight_transform_matches_the_definition():
    from infoptc.backends.tvm.winograd import transform_weights

    g = np.random.default_rng(0).standard_normal((3, 3, 2, 5)).astype(np.float32)
    u = transform_weights(g).reshape(4, 4, 2, 5)
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    for ci in range(2):
        for co in range(5):
            np.testing.assert_allclose(u[:, :, ci, co], G @ g[:, :, ci, co] @ G.T, rtol=1e-6, atol=1e-6)


@given(channels=st.sampled_from([16, 32, 48]), features=st.sampled_from([8, 24, 32, 64]), height=st.integers(1, 7),
       width=st.integers(1, 13), batch=st.integers(1, 2), residual=st.booleans())
@example(channels=32, features=24, height=3, width=13, batch=1, residual=False)  # 13 blocks: tiles 8 + 5
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
def test_winograd_convs_match_ort(channels, features, height, width, batch, residual, tmp_path_factory):
    """Even sizes (2..14 high, 2..26 wide) take the Winograd path, with bias, ReLU and a residual
    add fused into the kernel, on whole and part vectors of channels (8, 24, 48) and rows of
    blocks that end in a shorter register tile (9 to 13 blocks). All must match ORT."""
    model = _conv_model(batch, channels, features, 2 * height, 2 * width, residual=residual)
    _check_against_ort(model, tmp_path_factory.mktemp("wino"))


def test_resnet_convs_use_winograd(golden):
    """ResNet's 3x3 stride-1 convs (4 on 16 channels, 3 on 32, 3 on 64) each run as one Winograd
    kernel with the fused epilogue (bias, residual add, ReLU), scheduled by the Transform rule;
    the stem, the two strided 3x3 convs and the two 1x1 downsamples stay direct."""
    mod = lowered(infoptc.optimize(golden("resnet")))
    calls = _calls(mod)
    winograd = [name for name in calls if "winograd_conv2d" in name]
    assert len(winograd) == 10, calls
    assert len([name for name in calls if "conv2d" in name and "winograd" not in name]) == 5, calls
    for name in set(winograd):  # per row of 2x2 blocks, in one parallel loop: both transforms
        text = mod[name].script()  # and the matmul (their 4x4, 2x2 and register tiles unrolled)
        stages = [text.index(f'T.sblock("{stage}') for stage in ("winograd_input", "winograd_matmul")]
        assert text.count("T.parallel") == 1 and text.index("T.parallel") < min(stages), name
        assert text.count("T.unroll") >= 4 and "T.vectorized" in text, name
        assert "relu" in name, name
