"""EfficientNet-B0 at real size: torchvision ``efficientnet_b0`` layout and names, random weights.

features.0 Conv2dNormActivation (3x3, s2, 32, SiLU), seven stages of MBConv
blocks (torchvision's B0 table: expand ratio, kernel 3 or 5, stride, channels,
repeats), features.8 1x1 conv to 1280 + BN + SiLU, GlobalAveragePool, Flatten,
Gemm (classifier.1) -> 1000 logits.  An MBConv block is: 1x1 expand conv + BN +
SiLU (when the ratio is not 1), depthwise kxk conv (group=C) + BN + SiLU,
squeeze-excitation (GlobalAveragePool, 1x1 conv fc1 with bias, SiLU, 1x1 conv
fc2 with bias, Sigmoid, Mul with the block's activations; squeeze channels =
block input channels // 4), 1x1 projection conv + BN, and a residual Add when
stride is 1 and channels match.  SiLU is exported as x * Sigmoid(x), as
torch.onnx does at opset 17.  BatchNormalization is left un-fused.
5,288,548 parameters, like torchvision's.  He init on the fan-in from a fixed
seed; BN running statistics calibrated on a small batch while building (see
golden_models._cnn), so the network really normalises.

Input ``input`` float32 [1, 3, 224, 224] (ImageNet-normalised), output
``logits`` [1, 1000].  Real-size: built on demand, not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._cnn import (INPUT_SHAPE, NUM_CLASSES, _sigmoid, add, bn, classifier, conv, image_inputs,
                   acts, conv_np, silu, track)
from ._graph import FLOAT, TorchStyleGraph, normal, tensor_info

SEED = 30003
STEM_CHANNELS = 32
# (expand ratio, kernel, first stride, in channels, out channels, repeats): torchvision B0
STAGES = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
)
LAST_CHANNEL = 1280
REFERENCE_PARAMS = 5_288_548


def _conv_bn_act(g, rng, x, scope, local, pname, cin, cout, k, stride, groups=1, act=True):
    """torchvision Conv2dNormActivation: .0 conv, .1 bn, .2 SiLU (if ``act``)."""
    s = f"{scope}/{local}"
    y = conv(g, rng, x, f"{s}/{local}.0", f"{pname}.0", cin, cout, k, stride, groups)
    y = bn(g, rng, y, f"{s}/{local}.1", f"{pname}.1", cout,
           gamma=(0.7, 1.2) if act else (0.4, 0.8))
    return silu(g, y, f"{s}/{local}.2") if act else y


def _squeeze_excitation(g, rng, x, scope, pname, channels, squeeze):
    """torchvision SqueezeExcitation(channels, squeeze, activation=SiLU)."""
    scale = g.op("GlobalAveragePool", [x], f"{scope}/avgpool")
    w1_arr = normal(rng, (squeeze, channels, 1, 1), np.sqrt(2.8 / channels))
    b1_arr = normal(rng, (squeeze,), 0.1)
    w1 = g.init(f"{pname}.fc1.weight", w1_arr)
    b1 = g.init(f"{pname}.fc1.bias", b1_arr)
    scale = g.op("Conv", [scale, w1, b1], f"{scope}/fc1", dilations=[1, 1], group=1,
                 kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    sig = g.op("Sigmoid", [scale], f"{scope}/activation")  # SiLU (calibration value below)
    scale = g.op("Mul", [scale, sig], f"{scope}/activation")
    w2_arr = normal(rng, (channels, squeeze, 1, 1), np.sqrt(1.0 / squeeze))
    b2_arr = normal(rng, (channels,), 0.5)
    w2 = g.init(f"{pname}.fc2.weight", w2_arr)
    b2 = g.init(f"{pname}.fc2.bias", b2_arr)
    scale = g.op("Conv", [scale, w2, b2], f"{scope}/fc2", dilations=[1, 1], group=1,
                 kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    scale = g.op("Sigmoid", [scale], f"{scope}/scale_activation")
    v = acts(g)[x]
    h = conv_np(v.mean(axis=(2, 3), keepdims=True), w1_arr, b1_arr, 1, 0, 1)
    h = h * _sigmoid(h)
    gate = _sigmoid(conv_np(h, w2_arr, b2_arr, 1, 0, 1))
    y = g.op("Mul", [scale, x], scope)
    return track(g, y, gate * v)


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    x = _conv_bn_act(g, rng, "input", "/features", "features.0", "features.0",
                     3, STEM_CHANNELS, 3, 2)
    for si, (ratio, k, first_stride, stage_in, cout, repeats) in enumerate(STAGES, start=1):
        for bi in range(repeats):
            cin = stage_in if bi == 0 else cout
            stride = first_stride if bi == 0 else 1
            p = f"features.{si}.{bi}"
            s = f"/features/features.{si}/{p}"
            bs = f"{s}/block"
            bp = f"{p}.block"
            hidden = cin * ratio
            y = x
            j = 0
            if ratio != 1:
                y = _conv_bn_act(g, rng, y, bs, f"block.{j}", f"{bp}.{j}", cin, hidden, 1, 1)
                j += 1
            y = _conv_bn_act(g, rng, y, bs, f"block.{j}", f"{bp}.{j}", hidden, hidden, k,
                             stride, groups=hidden)
            j += 1
            y = _squeeze_excitation(g, rng, y, f"{bs}/block.{j}", f"{bp}.{j}", hidden,
                                    max(1, cin // 4))
            j += 1
            y = _conv_bn_act(g, rng, y, bs, f"block.{j}", f"{bp}.{j}", hidden, cout, 1, 1,
                             act=False)
            if stride == 1 and cin == cout:
                y = add(g, y, x, s)
            x = y

    x = _conv_bn_act(g, rng, x, "/features", "features.8", "features.8",
                     STAGES[-1][4], LAST_CHANNEL, 1, 1)
    x = g.op("GlobalAveragePool", [x], "/avgpool")
    x = g.op("Flatten", [x], "", axis=1)
    classifier(g, rng, x, "/classifier/classifier.1", "classifier.1", LAST_CHANNEL)

    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info("logits", FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        doc_string="EfficientNet-B0 real-size golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random ImageNet-normalised image; the graph's batch is fixed at 1."""
    return image_inputs(batch, seed)
