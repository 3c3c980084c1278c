"""MobileNetV2-style CNN (torchvision naming, narrow channels, un-fused BN).

Stem ConvBNReLU6 (3x3, s2), inverted residual blocks (1x1 expand conv,
3x3 depthwise conv with group=C, 1x1 linear projection, each followed by
BatchNormalization, ReLU6 exported as Clip(x, 0, 6) with min/max *inputs*),
residual Add where stride == 1 and channels match, final 1x1 ConvBNReLU6,
GlobalAveragePool, Flatten, Gemm (classifier.1).
Input ``input`` float32 [1, 3, 224, 224], output ``logits`` [1, 10].
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, TorchStyleGraph, normal, tensor_info, uniform

SEED = 2345
STEM_CHANNELS = 16
# (expand ratio t, out channels c, repeats n, first stride s) as in the paper
INVERTED_RESIDUAL_SETTING = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 2, 2))
LAST_CHANNEL = 128
NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 224, 224)


def _conv(g, rng, x, scope, pname, cin, cout, k, stride, groups=1):
    fan_in = (cin // groups) * k * k
    w = g.init(f"{pname}.weight", normal(rng, (cout, cin // groups, k, k), np.sqrt(2.0 / fan_in)))
    pad = (k - 1) // 2
    return g.op(
        "Conv", [x, w], scope,
        dilations=[1, 1], group=groups, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2,
    )


def _bn(g, rng, x, scope, pname, c):
    gamma = g.init(f"{pname}.weight", uniform(rng, (c,), 0.5, 1.5))
    beta = g.init(f"{pname}.bias", normal(rng, (c,), 0.1))
    mean = g.init(f"{pname}.running_mean", normal(rng, (c,), 0.2))
    var = g.init(f"{pname}.running_var", uniform(rng, (c,), 0.5, 2.0))
    return g.op(
        "BatchNormalization", [x, gamma, beta, mean, var], scope, epsilon=1e-5, momentum=0.9
    )


def _relu6(g, x, scope):
    lo = g.const(0.0, scope, np.float32)
    hi = g.const(6.0, scope, np.float32)
    return g.op("Clip", [x, lo, hi], scope)


def _conv_bn_relu(g, rng, x, scope, local, pname, cin, cout, k, stride, groups=1):
    """torchvision Conv2dNormActivation: submodules .0 conv, .1 bn, .2 ReLU6.

    ``scope`` is the parent's scope, ``local`` this module's name in it
    (``features.0`` or ``conv.1``), ``pname`` its full parameter prefix.
    """
    s = f"{scope}/{local}"
    y = _conv(g, rng, x, f"{s}/{local}.0", f"{pname}.0", cin, cout, k, stride, groups)
    y = _bn(g, rng, y, f"{s}/{local}.1", f"{pname}.1", cout)
    return _relu6(g, y, f"{s}/{local}.2")


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    idx = 0
    x = _conv_bn_relu(g, rng, "input", "/features", "features.0", "features.0",
                      3, STEM_CHANNELS, 3, 2)
    cin = STEM_CHANNELS
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            idx += 1
            stride = s if i == 0 else 1
            p = f"features.{idx}"
            scope = f"/features/{p}/conv"
            hidden = cin * t
            y = x
            j = 0
            if t != 1:
                y = _conv_bn_relu(g, rng, y, scope, f"conv.{j}", f"{p}.conv.{j}", cin, hidden, 1, 1)
                j += 1
            y = _conv_bn_relu(g, rng, y, scope, f"conv.{j}", f"{p}.conv.{j}", hidden, hidden, 3,
                              stride, groups=hidden)
            j += 1
            y = _conv(g, rng, y, f"{scope}/conv.{j}", f"{p}.conv.{j}", hidden, c, 1, 1)
            j += 1
            y = _bn(g, rng, y, f"{scope}/conv.{j}", f"{p}.conv.{j}", c)
            if stride == 1 and cin == c:
                y = g.op("Add", [x, y], f"/features/{p}")
            x = y
            cin = c
    idx += 1
    x = _conv_bn_relu(g, rng, x, "/features", f"features.{idx}", f"features.{idx}",
                      cin, LAST_CHANNEL, 1, 1)

    x = g.op("GlobalAveragePool", [x], "")
    x = g.op("Flatten", [x], "", axis=1)
    fc_w = g.init("classifier.1.weight",
                  normal(rng, (NUM_CLASSES, LAST_CHANNEL), np.sqrt(1.0 / LAST_CHANNEL)))
    fc_b = g.init("classifier.1.bias", normal(rng, (NUM_CLASSES,), 0.01))
    g.op("Gemm", [x, fc_w, fc_b], "/classifier/classifier.1", outputs=["logits"],
         alpha=1.0, beta=1.0, transB=1)

    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info("logits", FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        doc_string="MobileNetV2-style golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch,) + INPUT_SHAPE[1:]).astype(np.float32)}
