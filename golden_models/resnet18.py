"""ResNet-18 at real size: torchvision ``resnet18`` layout and names, random weights.

conv1 (7x7, s2, 64) - bn1 - relu - maxpool (3x3, s2), four stages of two
BasicBlocks (64/128/256/512 channels; the first block of stages 2-4
downsamples with stride 2 and a 1x1 conv + BN shortcut), GlobalAveragePool,
Flatten, Gemm (fc) -> 1000 logits.  11,689,512 parameters, like torchvision's.
BatchNormalization is left un-fused.  Weights: He init on the fan-in from a fixed
seed; BN running statistics calibrated on a small batch while building (see
golden_models._cnn), so the network really normalises; the last BN of each residual branch has a small
gamma (as trained ResNets do) so the residual stream grows slowly.

Input ``input`` float32 [1, 3, 224, 224] (ImageNet-normalised), output
``logits`` [1, 1000].  Real-size: built on demand, not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._cnn import (INPUT_SHAPE, NUM_CLASSES, acts, add, bn, classifier, conv, image_inputs,
                   maxpool_np, relu, track)
from ._graph import FLOAT, TorchStyleGraph, tensor_info

SEED = 18001
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)
BLOCKS_PER_STAGE = 2
REFERENCE_PARAMS = 11_689_512


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    x = conv(g, rng, "input", "/conv1", "conv1", 3, 64, 7, 2, pad=3)
    x = bn(g, rng, x, "/bn1", "bn1", 64)
    x = relu(g, x, "/relu")
    y = g.op("MaxPool", [x], "/maxpool", ceil_mode=0, dilations=[1, 1],
             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    x = track(g, y, maxpool_np(acts(g)[x], 3, 2, 1))

    cin = 64
    for si, (cout, first_stride) in enumerate(STAGES, start=1):
        for bi in range(BLOCKS_PER_STAGE):
            stride = first_stride if bi == 0 else 1
            p = f"layer{si}.{bi}"
            s = f"/layer{si}/{p}"
            identity = x
            y = conv(g, rng, x, f"{s}/conv1", f"{p}.conv1", cin, cout, 3, stride)
            y = bn(g, rng, y, f"{s}/bn1", f"{p}.bn1", cout)
            y = relu(g, y, f"{s}/relu")
            y = conv(g, rng, y, f"{s}/conv2", f"{p}.conv2", cout, cout, 3, 1)
            y = bn(g, rng, y, f"{s}/bn2", f"{p}.bn2", cout, gamma=(0.2, 0.5))
            if stride != 1 or cin != cout:
                identity = conv(g, rng, x, f"{s}/downsample/downsample.0",
                                f"{p}.downsample.0", cin, cout, 1, stride, pad=0)
                identity = bn(g, rng, identity, f"{s}/downsample/downsample.1",
                              f"{p}.downsample.1", cout)
            y = add(g, y, identity, s)
            x = relu(g, y, f"{s}/relu_1")
            cin = cout

    x = g.op("GlobalAveragePool", [x], "/avgpool")
    x = g.op("Flatten", [x], "", axis=1)
    classifier(g, rng, x, "/fc", "fc", cin)

    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info("logits", FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        doc_string="ResNet-18 real-size golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random ImageNet-normalised image; the graph's batch is fixed at 1."""
    return image_inputs(batch, seed)
