"""What the weight-value passes (cluster-weights, sparsify) share: which constants are weights."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .channel_groups import const_value

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def weight_tensors(graph: gs.Graph, min_size: int) -> list[tuple[gs.Node, np.ndarray]]:
    """(node, value) of every fp32 weight of a Conv, ConvTranspose, Gemm or MatMul (constant
    input 1, the activation a variable) with at least ``min_size`` elements, in graph order."""
    out = []
    for node in graph.nodes:
        index = WEIGHT_INPUT.get(node.op)
        if index is None or len(node.inputs) <= index or isinstance(node.inputs[0], gs.Constant):
            continue
        w = const_value(node.inputs[index])
        if w is not None and w.dtype == np.float32 and w.size >= min_size:
            out.append((node, w))
    return out
