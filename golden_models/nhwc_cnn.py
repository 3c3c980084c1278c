"""NHWC models as converters from NHWC frameworks (tf2onnx, TFLite) leave them: every Conv and
pool wrapped in ``Transpose(NHWC->NCHW) -> op -> Transpose(NCHW->NHWC)``, everything else running
in NHWC. The test and benchmark models of convert-layout (onnx.helper + numpy only).

``build()``: a residual CNN (conv stem, ``blocks`` blocks of bias-add, ReLU, conv and residual
add, a mean over H and W), input ``x`` float32 [1, size, size, 3], output ``y`` [1, channels].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class NhwcGraph:
    """Builds graphs as tf2onnx leaves NHWC models: every Conv/pool wrapped in Transposes."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.k, self.rng = [], [], 0, np.random.default_rng(seed)

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(h.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def const(self, array):
        name = self.name("c")
        self.inits.append(nh.from_array(np.asarray(array), name))
        return name

    def nchw_op(self, op, x, *extra, **attrs):
        inner = self.node(op, [self.node("Transpose", [x], perm=TO_NCHW), *extra], **attrs)
        return self.node("Transpose", [inner], perm=TO_NHWC)

    def conv(self, x, cin, cout):
        w = self.const((self.rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32))
        return self.nchw_op("Conv", x, w, pads=[1, 1, 1, 1])

    def model(self, inputs, outputs, opset=17):
        m = h.make_model(h.make_graph(self.nodes, "tf", inputs, outputs, self.inits),
                         opset_imports=[h.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def build(size: int = 56, channels: int = 32, blocks: int = 4, seed: int = 5) -> onnx.ModelProto:
    b = NhwcGraph(seed)
    x = b.conv("x", 3, channels)
    for _ in range(blocks):
        y = b.node("Relu", [b.node("Add", [x, b.const(np.linspace(-1, 1, channels, dtype=np.float32))])])
        x = b.node("Add", [x, b.conv(y, channels, channels)])
    b.node("ReduceMean", [x], axes=[1, 2], keepdims=0)
    b.nodes[-1].output[0] = "y"
    return b.model([h.make_tensor_value_info("x", T.FLOAT, [1, size, size, 3])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, channels])])
