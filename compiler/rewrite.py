"""Small graph-editing helpers shared by passes (on onnx-graphsurgeon graphs)."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def is_graph_io(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs) or any(t is tensor for t in graph.outputs)


def replace_uses(old: gs.Tensor, new: gs.Tensor, exclude: gs.Node | None = None) -> None:
    """Make every consumer of ``old`` (subgraph consumers included) read ``new`` instead."""
    for consumer in list(old.outputs):
        if consumer is exclude:
            continue
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor) -> bool:
    """Remove ``node``, whose first output equals ``src``, by rewiring its users to ``src``.

    If the output is a graph output, the producer of ``src`` is renamed to write it directly, so
    the model's interface keeps its names. Returns False (and leaves the graph) where that is
    impossible: the value would have to flow from a graph input or constant straight to an output.
    """
    dst = node.outputs[0]
    if any(t is dst for t in graph.outputs):
        if is_graph_io(graph, src) or isinstance(src, gs.Constant) or len(src.inputs) != 1:
            return False
        producer = src.inputs[0]
        replace_uses(src, dst, exclude=node)
        for i, t in enumerate(producer.outputs):
            if t is src:
                producer.outputs[i] = dst
    else:
        replace_uses(dst, src)
    node.inputs.clear()
    node.outputs.clear()
    return True
