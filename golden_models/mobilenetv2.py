"""MobileNetV2 at real size: torchvision ``mobilenet_v2`` layout and names, random weights.

features.0 Conv2dNormActivation (3x3, s2, 32, ReLU6), 17 inverted residual
blocks with the paper's (t, c, n, s) table (1x1 expand conv, 3x3 depthwise conv
with group=C, 1x1 linear projection, each followed by un-fused
BatchNormalization; ReLU6 exported as Clip(x, 0, 6) with min/max *inputs*;
residual Add where stride 1 and channels match), features.18 1x1 conv to
1280 + BN + ReLU6, GlobalAveragePool, Flatten, Gemm (classifier.1) -> 1000
logits.  3,504,872 parameters, like torchvision's.  He init on the fan-in from
a fixed seed; BN running statistics calibrated on a small batch while building
(see golden_models._cnn), so the network really normalises.

Input ``input`` float32 [1, 3, 224, 224] (ImageNet-normalised), output
``logits`` [1, 1000].  Real-size: built on demand, not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._cnn import INPUT_SHAPE, NUM_CLASSES, add, bn, classifier, conv, image_inputs, relu6
from ._graph import FLOAT, TorchStyleGraph, tensor_info

SEED = 20002
STEM_CHANNELS = 32
# (expand ratio t, out channels c, repeats n, first stride s), as in the paper / torchvision
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
LAST_CHANNEL = 1280
REFERENCE_PARAMS = 3_504_872


def _conv_bn_relu6(g, rng, x, scope, local, pname, cin, cout, k, stride, groups=1):
    """torchvision Conv2dNormActivation: submodules .0 conv, .1 bn, .2 ReLU6."""
    s = f"{scope}/{local}"
    y = conv(g, rng, x, f"{s}/{local}.0", f"{pname}.0", cin, cout, k, stride, groups)
    y = bn(g, rng, y, f"{s}/{local}.1", f"{pname}.1", cout)
    return relu6(g, y, f"{s}/{local}.2")


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    x = _conv_bn_relu6(g, rng, "input", "/features", "features.0", "features.0",
                       3, STEM_CHANNELS, 3, 2)
    cin = STEM_CHANNELS
    idx = 0
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
                y = _conv_bn_relu6(g, rng, y, scope, f"conv.{j}", f"{p}.conv.{j}",
                                   cin, hidden, 1, 1)
                j += 1
            y = _conv_bn_relu6(g, rng, y, scope, f"conv.{j}", f"{p}.conv.{j}",
                               hidden, hidden, 3, stride, groups=hidden)
            j += 1
            # linear bottleneck: fan-in init without the ReLU gain
            y = conv(g, rng, y, f"{scope}/conv.{j}", f"{p}.conv.{j}", hidden, c, 1, gain=1.0)
            j += 1
            residual = stride == 1 and cin == c
            y = bn(g, rng, y, f"{scope}/conv.{j}", f"{p}.conv.{j}", c,
                   gamma=(0.3, 0.6) if residual else (0.7, 1.2))
            if residual:
                y = add(g, x, y, f"/features/{p}")
            x = y
            cin = c
    idx += 1
    x = _conv_bn_relu6(g, rng, x, "/features", f"features.{idx}", f"features.{idx}",
                       cin, LAST_CHANNEL, 1, 1)

    x = g.op("GlobalAveragePool", [x], "")
    x = g.op("Flatten", [x], "", axis=1)
    classifier(g, rng, x, "/classifier/classifier.1", "classifier.1", LAST_CHANNEL)

    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info("logits", FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        doc_string="MobileNetV2 real-size golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random ImageNet-normalised image; the graph's batch is fixed at 1."""
    return image_inputs(batch, seed)
