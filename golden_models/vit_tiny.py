"""ViT-Ti/16 at real size: timm ``vit_tiny_patch16_224`` layout and names, random weights.

Patch embedding Conv 16x16 stride 16 (3 -> 192) + Reshape/Transpose to 196
tokens, class token (Concat), learned position embedding (Add), 12 pre-LN
blocks (hidden 192, 3 heads of 64, MLP 768 with erf GELU decomposed as
torch exports it at opset 17, LayerNorm as the opset-17 LayerNormalization op,
eps 1e-6), final LayerNorm, class token (Gather), Gemm head -> 1000 logits.
5,717,416 parameters, like timm's.  Random weights from a fixed seed: Linear
weights normal with std 1/sqrt(fan_in) (output projections half that), so the
attention is not uniform and activations look like a trained network's in
range; embeddings and tokens std 0.02.  See golden_models._transformer.vit.

Input ``input`` float32 [1, 3, 224, 224] (static), output ``logits`` [1, 1000].
Real-size: built on demand, not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._cnn import image_inputs
from ._graph import FLOAT, TorchStyleGraph, tensor_info
from ._transformer import ViTConfig, random_params, vit

SEED = 40004
CONFIG = ViTConfig(layers=12, hidden=192, heads=3, mlp=768)
INPUT_SHAPE = (1, 3, CONFIG.image, CONFIG.image)
REFERENCE_PARAMS = 5_717_416


def build() -> onnx.ModelProto:
    g = TorchStyleGraph()
    outputs = vit(g, random_params(SEED), CONFIG, batch=INPUT_SHAPE[0])
    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, list(INPUT_SHAPE))],
        [tensor_info(n, FLOAT, shape) for n, shape in outputs],
        doc_string="ViT-Ti/16 real-size golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random ImageNet-normalised image; the graph's batch is fixed at 1."""
    return image_inputs(batch, seed)
