"""ResNet-style CNN (torchvision ResNet naming, narrow channels, un-fused BN).

conv1(7x7,s2)-bn1-relu-maxpool, three stages of two BasicBlocks
(16/32/64 channels, the first block of stages 2 and 3 downsamples with a
1x1 conv + BN shortcut), GlobalAveragePool, Flatten, Gemm -> 10 logits.
Input ``input`` float32 [1, 3, 224, 224], output ``logits`` [1, 10].
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, TorchStyleGraph, normal, tensor_info, uniform

SEED = 1234
STAGES = ((16, 1), (32, 2), (64, 2))  # (channels, stride of first block)
BLOCKS_PER_STAGE = 2
NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 224, 224)


def _conv(g, rng, x, scope, pname, cin, cout, k, stride, pad):
    w = g.init(f"{pname}.weight", normal(rng, (cout, cin, k, k), np.sqrt(2.0 / (cin * k * k))))
    return g.op(
        "Conv", [x, w], scope,
        dilations=[1, 1], group=1, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2,
    )


def _bn(g, rng, x, scope, pname, c):
    gamma = g.init(f"{pname}.weight", uniform(rng, (c,), 0.5, 1.5))
    beta = g.init(f"{pname}.bias", normal(rng, (c,), 0.1))
    mean = g.init(f"{pname}.running_mean", normal(rng, (c,), 0.2))
    var = g.init(f"{pname}.running_var", uniform(rng, (c,), 0.5, 2.0))
    return g.op(
        "BatchNormalization", [x, gamma, beta, mean, var], scope, epsilon=1e-5, momentum=0.9
    )


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    x = _conv(g, rng, "input", "/conv1", "conv1", 3, 16, 7, 2, 3)
    x = _bn(g, rng, x, "/bn1", "bn1", 16)
    x = g.op("Relu", [x], "/relu")
    x = g.op("MaxPool", [x], "/maxpool",
             ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])

    cin = 16
    for si, (cout, first_stride) in enumerate(STAGES, start=1):
        for bi in range(BLOCKS_PER_STAGE):
            stride = first_stride if bi == 0 else 1
            p = f"layer{si}.{bi}"
            s = f"/layer{si}/{p}"
            identity = x
            y = _conv(g, rng, x, f"{s}/conv1", f"{p}.conv1", cin, cout, 3, stride, 1)
            y = _bn(g, rng, y, f"{s}/bn1", f"{p}.bn1", cout)
            y = g.op("Relu", [y], f"{s}/relu")
            y = _conv(g, rng, y, f"{s}/conv2", f"{p}.conv2", cout, cout, 3, 1, 1)
            y = _bn(g, rng, y, f"{s}/bn2", f"{p}.bn2", cout)
            if stride != 1 or cin != cout:
                identity = _conv(g, rng, x, f"{s}/downsample/downsample.0",
                                 f"{p}.downsample.0", cin, cout, 1, stride, 0)
                identity = _bn(g, rng, identity, f"{s}/downsample/downsample.1",
                               f"{p}.downsample.1", cout)
            y = g.op("Add", [y, identity], s)
            x = g.op("Relu", [y], f"{s}/relu_1")
            cin = cout

    x = g.op("GlobalAveragePool", [x], "/avgpool")
    x = g.op("Flatten", [x], "", axis=1)
    fc_w = g.init("fc.weight", normal(rng, (NUM_CLASSES, cin), np.sqrt(1.0 / cin)))
    fc_b = g.init("fc.bias", normal(rng, (NUM_CLASSES,), 0.01))
    g.op("Gemm", [x, fc_w, fc_b], "/fc", outputs=["logits"], alpha=1.0, beta=1.0, transB=1)

    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info("logits", FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        doc_string="ResNet-style golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch,) + INPUT_SHAPE[1:]).astype(np.float32)}
