"""An Inception-like model whose node order is breadth first, as exporters and a depth-sorted
toposort leave it: every branch of a block expands its input (1x1 conv to ``expand`` times the
channels, ReLU) before any branch reduces it again (3x3 conv to channels/branches), then the
branches are concatenated and added to the block's input.

Run in that order, all the expanded tensors of a block are live at once; run branch by branch,
one is. This is the memory planner's branchy benchmark and test model (onnx.helper + numpy only).
Input ``input`` float32 [1, C, S, S], output ``output`` of the same shape.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def build(channels: int = 64, size: int = 56, blocks: int = 3, branches: int = 4, expand: int = 4,
          seed: int = 7) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)).astype(np.float32),
                                             name))
        return name

    x = "input"
    width = channels // branches
    for b in range(blocks):
        scope = f"/block{b}"
        expanded = []
        for k in range(branches):  # breadth first: every expansion, then every activation, then every reduction
            w = weight(f"block{b}.branch{k}.expand.weight", (channels * expand, channels, 1, 1))
            nodes.append(helper.make_node("Conv", [x, w], [f"{scope}/branch{k}/expand/Conv_output_0"],
                                          name=f"{scope}/branch{k}/expand/Conv"))
        for k in range(branches):
            nodes.append(helper.make_node("Relu", [f"{scope}/branch{k}/expand/Conv_output_0"],
                                          [f"{scope}/branch{k}/Relu_output_0"], name=f"{scope}/branch{k}/Relu"))
            expanded.append(f"{scope}/branch{k}/Relu_output_0")
        reduced = []
        for k in range(branches):
            w = weight(f"block{b}.branch{k}.reduce.weight", (width, channels * expand, 3, 3))
            out = f"{scope}/branch{k}/reduce/Conv_output_0"
            nodes.append(helper.make_node("Conv", [expanded[k], w], [out], name=f"{scope}/branch{k}/reduce/Conv",
                                          pads=[1, 1, 1, 1]))
            reduced.append(out)
        nodes.append(helper.make_node("Concat", reduced, [f"{scope}/Concat_output_0"], name=f"{scope}/Concat", axis=1))
        y = "output" if b == blocks - 1 else f"{scope}/Add_output_0"
        nodes.append(helper.make_node("Add", [x, f"{scope}/Concat_output_0"], [y], name=f"{scope}/Add"))
        x = y
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="infoptc.golden_models", producer_version="1.0")
    model.ir_version = 8
    return model


def example_inputs(channels: int = 64, size: int = 56, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((1, channels, size, size)).astype(np.float32)}
