"""Small CNNs for the compression tests, built with onnx.helper (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


class Net:
    """A tiny graph builder: ``conv``, ``bn``, ``op`` append nodes and return the output name."""

    def __init__(self, seed: int = 0, channels: int = 3, size: int = 8):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0
        self.size = size
        self.inputs = [h.make_tensor_value_info("x", T.FLOAT, [1, channels, size, size])]

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, value: np.ndarray, base: str = "w") -> str:
        name = self.name(base)
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list, outputs: int = 1, **attrs):
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(h.make_node(op, inputs, outs, name=self.name(op + "_"), **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        w = self.const((self.rng.standard_normal((cout, cin // group, k, k)) * 0.3).astype(np.float32))
        ins = [x, w] + ([self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b")] if bias else [])
        return self.op("Conv", ins, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 2, c)]
        return self.op("BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params])

    def head(self, x: str, c: int, classes: int = 5, spatial: int | None = None) -> onnx.ModelProto:
        side = self.size if spatial is None else spatial
        flat = self.op("Flatten", [x], axis=1)
        w = self.const((self.rng.standard_normal((c * side * side, classes)) * 0.1).astype(np.float32))
        out = self.op("Gemm", [flat, w, self.const(np.zeros(classes, np.float32), "b")])
        return self.model(out, [1, classes])

    def model(self, out: str, shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        graph = h.make_graph(self.nodes, "g", self.inputs, [h.make_tensor_value_info("y", T.FLOAT, shape)],
                             self.inits)
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def every_kind() -> onnx.ModelProto:
    """Conv+BN, a grouped conv, a residual Add, a Concat, a depthwise conv, a per-channel Mul, a
    Split, a second residual, MaxPool, Flatten into a Gemm."""
    n = Net(seed=1)
    b1 = n.bn(n.conv("x", 3, 16), 16)
    r1 = n.op("Relu", [b1])
    g = n.op("Relu", [n.conv(r1, 16, 16, group=4)])
    b2 = n.bn(n.conv(g, 16, 16, k=1), 16)
    r3 = n.op("Relu", [n.op("Add", [b2, b1])])
    c3 = n.conv(r3, 16, 8)
    cat = n.op("Concat", [r3, c3], axis=1)
    dw = n.conv(cat, 24, 24, group=24)
    m = n.op("Mul", [dw, n.const(n.rng.uniform(0.5, 1.5, (1, 24, 1, 1)).astype(np.float32), "s")])
    s0, s1 = n.op("Split", [m, n.const(np.array([16, 8], np.int64), "split")], outputs=2, axis=1)
    add2 = n.op("Add", [n.conv(s0, 16, 8), s1])
    pool = n.op("MaxPool", [add2], kernel_shape=[2, 2], strides=[2, 2])
    return n.head(pool, 8, spatial=4)


def transposed_and_reshaped() -> onnx.ModelProto:
    """Conv -> PRelu (per-channel slope) -> ConvTranspose (stride 2) -> InstanceNormalization ->
    Transpose to NHWC and back -> Reshape [1, -1] into a Gemm; value_info declared for every tensor."""
    n = Net(seed=4)
    x = n.op("PRelu", [n.conv("x", 3, 12), n.const(n.rng.uniform(0.1, 0.3, (12, 1, 1)).astype(np.float32), "slope")])
    w = n.const((n.rng.standard_normal((12, 8, 2, 2)) * 0.3).astype(np.float32))
    x = n.op("ConvTranspose", [x, w, n.const(n.rng.standard_normal(8).astype(np.float32) * 0.1, "b")], strides=[2, 2])
    x = n.op("InstanceNormalization", [x, n.const(n.rng.uniform(0.5, 1.5, 8).astype(np.float32), "s"),
                                       n.const(n.rng.standard_normal(8).astype(np.float32) * 0.1, "b")])
    x = n.op("Transpose", [n.op("Relu", [n.op("Transpose", [x], perm=[0, 2, 3, 1])])], perm=[0, 3, 1, 2])
    flat = n.op("Reshape", [x, n.const(np.array([1, 8 * 16 * 16], np.int64), "shape")])
    w = n.const((n.rng.standard_normal((8 * 16 * 16, 4)) * 0.05).astype(np.float32))
    n.op("Gemm", [flat, w])
    return onnx.shape_inference.infer_shapes(n.model("", [1, 4]))
