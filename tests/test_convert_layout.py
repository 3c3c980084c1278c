"""convert-layout: Transposes of an NHWC-converted model sink through layout-agnostic ops and
cancel, leaving the ones at the boundary; outputs bit-identical through data movement and
elementwise ops, within fp32 reassociation through reductions and Softmax."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h

import infoptc
from infoptc import testing

from golden_models.nhwc_cnn import TO_NCHW, TO_NHWC, NhwcGraph, build


def tf_style_cnn():
    """conv -> +bias -> relu -> {conv, maxpool} -> concat(axis 3) -> pad -> slice -> conv
    -> + residual -> softmax(axis 3) -> mean over H, W."""
    b = NhwcGraph()
    x = b.conv("x", 3, 8)
    x = b.node("Relu", [b.node("Add", [x, b.const(np.linspace(-1, 1, 8, dtype=np.float32))])])
    left = b.conv(x, 8, 4)
    right = b.nchw_op("MaxPool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    cat = b.node("Concat", [left, right], axis=3)  # 4 + 8 channels
    padded = b.node("Pad", [cat, b.const(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64))])
    sliced = b.node("Slice", [padded, b.const(np.array([1, 1], np.int64)), b.const(np.array([9, 9], np.int64)),
                              b.const(np.array([1, 2], np.int64))])
    y = b.conv(sliced, 12, 8)
    y = b.node("Softmax", [b.node("Mul", [b.node("Add", [y, x]), b.const(np.float32(0.5))])], axis=3)
    out = b.node("ReduceMean", [y], axes=[1, 2], keepdims=0)
    b.nodes[-1].output[0] = "y"
    return b.model([h.make_tensor_value_info("x", T.FLOAT, [1, 8, 8, 3])], [h.make_tensor_value_info("y", T.FLOAT, [1, 8])])


def _transposes(m):
    return [n for n in m.graph.node if n.op_type == "Transpose"]


def test_only_the_boundary_transpose_is_left():
    m = tf_style_cnn()
    assert len(_transposes(m)) == 8
    out = infoptc.optimize(m, passes="convert-layout")
    left = _transposes(out)
    # the input's NHWC->NCHW is the boundary; the mean over H, W needs no Transpose back
    assert len(left) == 1 and left[0].input[0] == "x"
    testing.assert_equivalent(m, out, "reassociating")
    # axes were remapped: the concat joins channels, the softmax runs over channels
    by_op = {n.op_type: n for n in out.graph.node}
    assert [a.i for a in by_op["Concat"].attribute if a.name == "axis"] == [1]
    assert [a.i for a in by_op["Softmax"].attribute if a.name == "axis"] == [1]


def test_keepdims_reduction_and_output_boundary():
    b = NhwcGraph(1)
    y = b.conv("x", 3, 4)
    y = b.node("ReduceMax", [b.node("Sigmoid", [y])], axes=[3], keepdims=1)  # max: exact in any order
    b.nodes[-1].output[0] = "y"
    m = b.model([h.make_tensor_value_info("x", T.FLOAT, [1, 5, 5, 3])], [h.make_tensor_value_info("y", T.FLOAT, [1, 5, 5, 1])])
    out = infoptc.optimize(m, passes="convert-layout")
    assert [list(n.attribute[0].ints) for n in _transposes(out)] == [TO_NCHW, TO_NHWC]
    assert _transposes(out)[-1].output[0] == "y"  # the Transpose back is the graph's last op
    testing.assert_equivalent(m, out, "exact")


def test_a_transpose_with_other_readers_stays_and_nothing_gets_worse():
    b = NhwcGraph(2)
    t = b.node("Transpose", ["x"], perm=TO_NCHW)
    r = b.node("Relu", [t])
    s = b.node("Add", [t, "z"])  # z is not transposed: the Add cannot take the Transpose
    b.nodes[-1].output[0] = "y"
    b.nodes[-2].output[0] = "r"
    m = b.model([h.make_tensor_value_info("x", T.FLOAT, [1, 2, 2, 3]), h.make_tensor_value_info("z", T.FLOAT, [1, 3, 2, 2])],
                [h.make_tensor_value_info("r", T.FLOAT, [1, 3, 2, 2]), h.make_tensor_value_info("y", T.FLOAT, [1, 3, 2, 2])])
    del r, s
    out = infoptc.optimize(m, passes="convert-layout")
    assert len(_transposes(out)) == 1
    testing.assert_equivalent(m, out, "exact")


def test_nchw_models_are_left_alone():
    from golden_models import BUILDERS

    m = BUILDERS["resnet"]()
    out = infoptc.optimize(m, passes="convert-layout")
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]


def test_data_movement_and_elementwise_sinking_is_bit_exact():
    b = NhwcGraph(3)
    x = b.conv("x", 3, 6)
    x = b.node("Concat", [b.node("Relu", [x]), b.node("Neg", [x])], axis=3)
    x = b.node("Slice", [x, b.const(np.array([0, 2], np.int64)), b.const(np.array([4, 11], np.int64)),
                         b.const(np.array([1, 3], np.int64))])
    x = b.conv(b.node("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int64))]), 9, 2)
    b.nodes[-1].output[0] = "y"
    m = b.model([h.make_tensor_value_info("x", T.FLOAT, [1, 4, 5, 3])], [h.make_tensor_value_info("y", T.FLOAT, [1, 5, 6, 2])])
    out = infoptc.optimize(m, passes="convert-layout")
    assert len(_transposes(out)) == 2
    testing.assert_equivalent(m, out, "exact")


# op kinds around Transposes: some graphs let one sink and cancel
LAYOUT_OPS = ("transpose", "transpose-sandwich", "unary", "binary", "concat", "slice", "reduce", "softmax", "split",
              "clip", "conv")


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(model=testing.onnx_graphs(symbolic=False, max_ops=10, ops=LAYOUT_OPS), data=st.data())
def test_random_graphs_keep_outputs_and_never_gain_transposes(model, data):
    out = infoptc.optimize(model, passes="convert-layout")
    assert len(_transposes(out)) <= len(_transposes(model))
    testing.assert_equivalent(model, out, "reassociating", data.draw(testing.model_inputs(model)))


def test_residual_nhwc_cnn_keeps_one_transpose():
    m = build(size=8, channels=4, blocks=2)
    out = infoptc.optimize(m, passes="convert-layout")
    assert len(_transposes(m)) == 6 and len(_transposes(out)) == 1
    testing.assert_equivalent(m, out, "reassociating")
